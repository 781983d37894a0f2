#!/bin/sh
# Run by the minio-init service on every `docker compose up`: the farm's bucket, and one MinIO user per
# fluxfarm role held to it by the policy beside this script, so that no fluxfarm process holds MinIO's
# root keys. Idempotent. A password unset or still the placeholder of infra/env.example stops it.
set -eu
here=$(dirname "$0")
for name in MINIO_ROOT_PASSWORD MINIO_WORKER_PASSWORD MINIO_PRODUCER_PASSWORD; do
    eval "value=\${$name:-}"
    case "$value" in
        "" | change-me*) echo "init.sh: $name is unset or still the placeholder of infra/env.example" >&2; exit 1 ;;
    esac
done
mc alias set farm "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "farm/$FLUXFARM_BUCKET"
for role in worker producer; do
    policy="/tmp/fluxfarm-$role-policy.json"
    sed "s/@BUCKET@/$FLUXFARM_BUCKET/g" "$here/$role-policy.json" > "$policy"
    mc admin policy create farm "fluxfarm-$role" "$policy"
    eval "secret=\$MINIO_$(echo "$role" | tr '[:lower:]' '[:upper:]')_PASSWORD"
    mc admin user add farm "fluxfarm-$role" "$secret"
    mc admin policy attach farm "fluxfarm-$role" --user "fluxfarm-$role" || true  # attached on an earlier run
done
