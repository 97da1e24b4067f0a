#!/bin/sh
# A self-signed certificate for the fleet's front (HAProxy wants the certificate and key in one PEM).
# Replace certs/front.pem with a real one for production; cargo trusts the system's CAs, or
# CARGO_HTTP_CAINFO / [http] cainfo for a private CA.
set -eu
cd "$(dirname "$0")"
mkdir -p certs
name="${1:-localhost}"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
  -keyout certs/front.key -out certs/front.crt -subj "/CN=$name" \
  -addext "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1"
cat certs/front.crt certs/front.key > certs/front.pem
chmod 600 certs/front.key
chmod 644 certs/front.pem  # the front container reads it as its own unprivileged user; keep certs/ private on the host
echo "wrote $(pwd)/certs/front.pem (trust certs/front.crt in cargo: [http] cainfo)"
