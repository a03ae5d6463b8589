"""refresher: keeps OAuth2 client-credentials access tokens fresh for workloads that cannot."""

__version__ = "0.1.0"
