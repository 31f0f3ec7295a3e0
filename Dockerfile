# The gateway image. The config is not baked in: mount a folder (every *.yaml in it is merged) at
# /etc/gateway, with server.listen on 0.0.0.0 so the published port reaches it, e.g.
#   docker build -t gateway .
#   docker run -p 8080:8080 -v "$PWD/myconfig:/etc/gateway:ro" gateway
#   docker run -v "$PWD/myconfig:/etc/gateway:ro" gateway check
# An admin_listen outside loopback also needs GATEWAY_ADMIN_TOKEN. docker-compose.yml shows both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that editing the source reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY gateway/ ./gateway/
RUN pip install --no-cache-dir --no-deps . \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin gateway

# The demo upstream of docker-compose.yml runs from the same image.
COPY examples/ ./examples/

USER 10001:10001

EXPOSE 8080 9090

# slim has no curl; the standard library can ask /healthz just as well.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["run"]
