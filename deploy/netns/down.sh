#!/usr/bin/env bash
# Takes down the test bed deploy/netns/up.sh made (the same --prefix): its delaying links,
# then its namespaces (hosts, homes, router). Safe to run when there is none.
set -uo pipefail
prefix=pb
[ "${1:-}" = --prefix ] && prefix=${2:?--prefix needs a name}
pids=/run/potluck-netbed/$prefix.pids
if [ -f "$pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null; done < "$pids"
    rm -f "$pids" /run/potluck-netbed/"$prefix".*.log
fi
for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}(r|h?[0-9]+)$"); do
    ip netns del "$ns"
done
