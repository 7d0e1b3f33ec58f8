# syntax=docker/dockerfile:1
# The meshfed image: the node proxy and the east-west gateway (`python -m ztunnel`), the controller
# (`meshfed controller run`) and the demo workloads (`python -m clusters.lab.demo_server`), built
# from this checkout. `meshfed image build [--tag T] [--fleet DIR]` runs `docker build` and then
# `kind load docker-image` into each kind cluster; clusters.kind.manifests runs the processes.
#
# Two stages: the build stage installs exactly requirements.lock (every file checked against its
# hash, as `make venv` does) and meshfed itself into /opt/meshfed; the runtime stage is the slim
# base plus that virtualenv and the two tools the node proxy's capture needs (iptables, iproute2).
# The default user is non-root (65532); only the node proxy's DaemonSet runs as root, with
# NET_ADMIN and NET_RAW and nothing else, because iptables in the node's namespace needs them.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meshfed
COPY requirements.lock /src/requirements.lock
RUN /opt/meshfed/bin/pip install --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY gitops /src/gitops
COPY federation /src/federation
COPY ztunnel /src/ztunnel
COPY clusters /src/clusters
COPY chaos /src/chaos
RUN /opt/meshfed/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/meshfed/bin/python -c "import ztunnel.__main__, federation.cli.main, clusters.lab.demo_server"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin meshfed
COPY --from=build /opt/meshfed /opt/meshfed
ENV PATH=/opt/meshfed/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 RAY_USE_UVLOOP=0
USER 65532:65532
WORKDIR /tmp
CMD ["meshfed", "--help"]
