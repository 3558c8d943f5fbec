# sliceproxy node agent image. Debian's iptables ships both the legacy and the
# nft variants; sliceproxy picks the one the node already uses (or
# --iptables-backend).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables conntrack ipset iproute2 kmod \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sliceproxy
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir . && useradd --system --no-create-home sliceproxy

# Runs as root in the DaemonSet (it must program netfilter); the user exists
# for `sliceproxy run --dry-run`, which needs no privileges.
ENTRYPOINT ["sliceproxy"]
CMD ["run"]
