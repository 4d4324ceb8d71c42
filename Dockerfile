# The merf-dask runtime image: the `merf-dask` CLI and `dask scheduler` / `dask worker`, with
# the s3, gcs, azure, plot and lightgbm extras. One image serves every pod of the manifests in
# cluster_configs/kubernetes. Build it from the repository root:
#
#   docker build -t registry.example.org/merf-dask:0.1.0 .
#
# The package is installed into a virtualenv in a build stage and only that virtualenv is
# copied into the final stage, so no source tree, pip cache or build dependency ships.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/merf-dask
COPY pyproject.toml README.md /src/
COPY merf_dask /src/merf_dask
# every dependency ships manylinux wheels, so the slim image needs no compiler
RUN /opt/merf-dask/bin/pip install --no-cache-dir "/src[s3,gcs,azure,plot,lightgbm]"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 1000 merf \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/merf \
       --shell /usr/sbin/nologin merf
# root-owned, so the code cannot be changed by the user that runs it
COPY --from=build /opt/merf-dask /opt/merf-dask
ENV PATH=/opt/merf-dask/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/merf \
    DASK_TEMPORARY_DIRECTORY=/tmp
WORKDIR /home/merf
USER 1000:1000
# No ENTRYPOINT: Kubernetes `args` replace CMD, so each pod names its own program
# (`dask scheduler`, `dask worker ...`, `merf-dask fit ...`).
CMD ["merf-dask", "--help"]
