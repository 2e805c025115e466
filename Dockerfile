# One image for every role (migrate, scheduler, CPU and GPU workers); the command picks the role.
# GPU images: build with --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim-bookworm
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"
COPY pyproject.toml README.md alembic.ini ./
COPY monitor ./monitor
COPY workers ./workers
COPY model ./model
COPY migrations ./migrations
COPY templates ./templates
RUN pip install -e .
RUN useradd --create-home unirs && mkdir -p /app/var && chown unirs /app/var
USER unirs
ENTRYPOINT ["unirs-monitor"]
CMD ["--help"]
