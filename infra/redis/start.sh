#!/bin/sh
# Start redis-server with fluxfarm's ACL users (users.acl beside this script). Each user's password comes
# from REDIS_<USER>_PASSWORD and goes into the ACL file as its sha256: no password on a command line
# (`ps` shows them), none stored in clear. A missing password, or one still the placeholder of
# infra/env.example, stops the start. Arguments go on to redis-server.
set -eu
here=$(dirname "$0")
acl=${REDIS_ACL_FILE:-/tmp/fluxfarm-users.acl}
fill=""
for user in ADMIN WORKER PRODUCER GATEWAY EXPORTER FLOWER; do
    eval "password=\${REDIS_${user}_PASSWORD:-}"
    case "$password" in
        "") echo "start.sh: REDIS_${user}_PASSWORD is not set" >&2; exit 1 ;;
        change-me*) echo "start.sh: REDIS_${user}_PASSWORD is still the placeholder of infra/env.example" >&2; exit 1 ;;
    esac
    digest=$(printf %s "$password" | sha256sum | cut -d' ' -f1)
    fill="$fill -e s/@${user}@/${digest}/"
done
umask 077
# shellcheck disable=SC2086  # $fill is a list of sed expressions
sed -e "/^#/d" -e "/^$/d" $fill "$here/users.acl" > "$acl"  # redis reads no comments
if [ "$(id -u)" = 0 ] && id redis > /dev/null 2>&1; then
    chown redis "$acl"  # the image's entrypoint runs redis-server as the redis user
fi
if command -v docker-entrypoint.sh > /dev/null 2>&1; then
    exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"  # the official image: it steps down to redis
fi
exec redis-server --aclfile "$acl" "$@"
