# One image for the whole stack: the daemon (`luanette`), the simulators (`luanette-sim`)
# and the CLI (`luanette-cli`). docker-compose.yml picks the command per service.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/luanette
COPY pyproject.toml README.md ./
COPY hooteproto ./hooteproto
COPY luanette ./luanette
# before the install: luanette/examples links to it, and the package ships the examples
COPY examples ./examples
RUN pip install .
COPY deploy ./deploy

# The CAS and the job database live on volumes (see docker-compose.yml).
# (made here so named volumes mounted on them start out owned by the daemon's user)
RUN useradd --create-home --uid 1000 luanette && mkdir -p /data/cas /data/state /data/keys && chown -R luanette /data
USER luanette
VOLUME ["/data"]
EXPOSE 5570 5571 5572

# Reachable from outside the container, so CURVE is required: create the keys first
# (`docker run -v keys:/data/keys luanette:dev luanette keys init /data/keys`; the
# compose file has a one-shot service for it).
CMD ["luanette", "serve", "--bind", "tcp://0.0.0.0:5570", "--pub", "tcp://0.0.0.0:5572", \
     "--cas-root", "/data/cas", "--state-dir", "/data/state", "--curve", "/data/keys/server"]
