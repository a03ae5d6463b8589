"""Test doubles for the test suite and the benchmarks; never shipped.

Neither the wheel (``[tool.setuptools.packages.find]`` includes ``refresher*`` only) nor the
image (the Dockerfile copies ``refresher/`` only) contains this package; tests/test_packaging.py
checks both. Import it from the repository's root: pytest puts the root on ``sys.path``
(``pythonpath`` in pyproject.toml) and so does ``python -m bench...`` run from there.

* :mod:`testdoubles.idp`: the local token server (:mod:`refresher.localidp`, which the demo
  ships) plus a fault injector;
* :mod:`testdoubles.kubeapi`: a Kubernetes API server for Secrets and Leases;
* :mod:`testdoubles.tls`: an HTTP(S) server whose answers are scripted as raw bytes.

All of them are :class:`refresher.loopback.LoopbackServer` subclasses: loopback only, a
daemon thread, a prompt ``stop()``, silent about clients that went away.
"""
