# One image for every role (migrate, scheduler, CPU workers); the command picks the role. GPU workers use
# the same Dockerfile with the CUDA build of the same torch version (docker-compose.yml's worker-gpu does this):
#   docker build -t unirs-monitor:latest .                                                   # CPU torch
#   docker build -t unirs-monitor:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The CUDA wheel brings its CUDA runtime and cuDNN as pip packages; the host provides only the NVIDIA driver
# (NVIDIA Container Toolkit). `unirs-monitor health worker --require-cuda` says whether a GPU is visible.
FROM python:3.11-slim-bookworm
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# torch first, from the chosen index: `pip install -e .` then finds torch==2.13.0 (+cpu or +cu128) satisfied.
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md alembic.ini ./
# Every package of [tool.setuptools.packages.find] (tests/test_deployment.py checks this list).
COPY core ./core
COPY eo ./eo
COPY monitor ./monitor
COPY web ./web
COPY workers ./workers
COPY model ./model
COPY devtools ./devtools
COPY migrations ./migrations
COPY templates ./templates
RUN pip install -e .
RUN useradd --create-home unirs && mkdir -p /app/var && chown unirs /app/var
USER unirs
ENTRYPOINT ["unirs-monitor"]
CMD ["--help"]
