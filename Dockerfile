# syntax=docker/dockerfile:1
#
# refresher's container image.
#
#   docker build -t refresher:0.1.0 .
#   docker run --read-only --tmpfs /tmp -v "$PWD/config.yaml:/etc/refresher/config.yaml:ro" \
#       -p 9464:9464 refresher:0.1.0
#
# Two stages on the same pinned base, so the virtualenv built in the first runs unchanged in
# the second: `build` installs the runtime dependencies from requirements.lock (exact
# versions, each file checked against its sha256 from PyPI) into /opt/refresher, then makes
# the wheel (the only place build tools and downloads exist) and installs it without
# dependencies; the final stage copies that virtualenv alone, with no pip, wheel, build tree
# or cache. requirements.lock is written by `make lock` and covers Python 3.11 and 3.12.
#
# The final image runs as the numeric non-root user 65532 and writes nothing outside mounted
# volumes: bytecode is compiled at build time, PYTHONDONTWRITEBYTECODE stops any write at run
# time, and temporary files and $HOME go to /tmp (mount a tmpfs or emptyDir there).
# tests/test_image_recipe.py performs the `build` stage's steps on the test machine and lints
# this file with hadolint, so the recipe cannot rot unnoticed.

FROM python:3.12.10-slim-bookworm AS build

# No pip configuration file applies (PIP_CONFIG_FILE=/dev/null skips them all): the lock holds
# the hashes of PyPI's files, and a pip.conf in a base image could point pip elsewhere.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CONFIG_FILE=/dev/null \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# A virtualenv without pip, into which the build stage's pip installs the locked runtime
# dependencies (byte-compiled). Its own layer: it is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN python -m venv --without-pip /opt/refresher \
    && python -m pip --python /opt/refresher/bin/python install --no-cache-dir \
        --require-hashes -r requirements.lock

COPY pyproject.toml README.md ./
COPY refresher/ refresher/

# The wheel, installed without dependencies; `pip check` fails the build if pyproject.toml
# asks for something the lock does not provide (run `make lock`).
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m pip --python /opt/refresher/bin/python install --no-cache-dir --no-deps \
        /wheels/refresher-*.whl \
    && python -m pip --python /opt/refresher/bin/python check \
    && /opt/refresher/bin/refresher --version


FROM python:3.12.10-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="refresher" \
      org.opencontainers.image.description="Keeps OAuth2 client-credentials tokens fresh in files and Kubernetes Secrets, with Prometheus metrics." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.10-slim-bookworm"

# A named user for the numeric id (tools that look the user up find one), the config folder
# the Helm chart and the README mount into, and no package installer left in the image.
RUN groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --no-log-init nonroot \
    && mkdir -p /etc/refresher/secrets \
    && python -m pip uninstall --yes --no-cache-dir pip \
    && rm -rf /root/.cache

COPY --from=build /opt/refresher /opt/refresher

ENV PATH=/opt/refresher/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp \
    TMPDIR=/tmp

USER 65532:65532
WORKDIR /tmp
EXPOSE 9464

ENTRYPOINT ["refresher"]
CMD ["run", "-c", "/etc/refresher/config.yaml"]
