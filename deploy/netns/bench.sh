#!/usr/bin/env bash
# Decode speed of a three-host pipeline on the bed, against the ideal
# 1 / (compute per token + hops x RTT): a coordinator on host 1, three nodes (each holding
# about a third of the default model) on hosts 2-4, at each round trip given. Compute per
# token is the 0 ms figure's (its hops cost nothing), so run 0 first. Root, iproute2,
# nftables, and `cargo build -p potluck --bins` (or POTLUCK and POTLUCK_NETBED set).
# --transport tcp or quic: every peer listens on that one only; auto: on both (as by
# default), the nodes dial the coordinator's TCP address and move to QUIC themselves.
#
#   deploy/netns/bench.sh --rtts "0 20 40 80" --loss 0 --transport tcp
set -euo pipefail
here=$(dirname "$0")
potluck=${POTLUCK:-$here/../../target/debug/potluck}
export POTLUCK_NETBED=${POTLUCK_NETBED:-$here/../../target/debug/potluck-netbed}
rtts="0 20 40 80" loss=0 transport=tcp tokens=64 prefix=pq
while [ $# -gt 0 ]; do
    case "$1" in
        --rtts) rtts=$2; shift 2 ;;
        --loss) loss=${2%\%}; shift 2 ;;
        --transport) transport=$2; shift 2 ;;
        --tokens) tokens=$2; shift 2 ;;
        *) echo "usage: $0 [--rtts \"0 20 40 80\"] [--loss PCT] [--transport tcp|quic|auto] [--tokens N]" >&2; exit 2 ;;
    esac
done
case "$transport" in
    tcp) at() { echo "--listen /ip4/$1/tcp/0"; } ;;
    quic) at() { echo "--listen /ip4/$1/udp/0/quic-v1"; } ;;
    auto) at() { echo "--listen /ip4/$1/tcp/0 --listen /ip4/$1/udp/0/quic-v1"; } ;;
    *) echo "--transport: tcp, quic or auto" >&2; exit 2 ;;
esac
work=$(mktemp -d)
pids=()
stop() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
trap 'stop; "$here/down.sh" --prefix $prefix; rm -rf "$work"' EXIT
in_host() { local h=$1; shift; ip netns exec "$prefix$h" "$@"; }
# Seconds one completion of N tokens takes, through the coordinator's API in host 1.
timed() {
    in_host 1 curl -sS -o /dev/null -w '%{time_total}' -H 'content-type: application/json' \
        -d "{\"prompt\": \"1, 2, 3, 4,\", \"temperature\": 0, \"max_tokens\": $1}" \
        "http://$api/v1/completions"
}
t0=""
printf '%-8s %-6s %-10s %-10s %-10s %-6s %s\n' transport rtt_ms loss_pct tok_s ideal ratio runs_on
for rtt in $rtts; do
    "$here/up.sh" --prefix $prefix --hosts 4 --rtt "${rtt}ms" --loss "$loss" >/dev/null
    rm -rf "$work"/*
    in_host 1 "$potluck" coordinator --data-dir "$work/c" $(at 203.0.113.11) \
        --no-mdns --http 127.0.0.1:0 --canary-interval 0 >"$work/c.log" 2>&1 &
    pids+=($!)
    want=tcp; [ "$transport" = quic ] && want=udp
    for _ in $(seq 300); do grep -q '^api listening' "$work/c.log" 2>/dev/null \
        && grep -q "^listening /ip4/203.0.113.11/$want/" "$work/c.log" && break; sleep 0.1; done
    api=$(sed -n 's|^api listening on http://||p' "$work/c.log" | head -1)
    addr=$(sed -n "s|^listening \(/ip4/203.0.113.11/$want/.*\)|\1|p" "$work/c.log" | head -1)
    for h in 2 3 4; do
        in_host $h "$potluck" node --data-dir "$work/n$h" $(at 203.0.113.1$h) \
            --no-mdns --bootstrap "$addr" --max-memory 130M --threads 1 \
            --advert-interval 1 >"$work/n$h.log" 2>&1 &
        pids+=($!)
    done
    for _ in $(seq 600); do
        [ "$(grep -c ' serves blocks ' "$work/c.log" || true)" -ge 3 ] && break; sleep 0.2
    done
    # What the pool runs on, as the coordinator sees it.
    runs_on=$(in_host 1 curl -sS "http://$api/api/pool" \
        | grep -o '"transport":"[a-z]*"' | sort | uniq -c | tr -s ' \n' ' ')
    # Warm up, then time a short and a long completion: their difference is pure decode.
    timed 4 >/dev/null; timed 4 >/dev/null
    short=$(timed 8); long=$(timed $((tokens + 8)))
    tps=$(awk -v s="$short" -v l="$long" -v n="$tokens" 'BEGIN { printf "%.2f", n / (l - s) }')
    [ -z "$t0" ] && [ "$rtt" = 0 ] && t0=$(awk -v t="$tps" 'BEGIN { print 1 / t }')
    if [ -n "$t0" ]; then
        ideal=$(awk -v t="$t0" -v r="$rtt" 'BEGIN { printf "%.2f", 1 / (t + 3 * r / 1000) }')
        ratio=$(awk -v a="$tps" -v i="$ideal" 'BEGIN { printf "%.2f", a / i }')
    else
        ideal=- ratio=-
    fi
    printf '%-8s %-6s %-10s %-10s %-10s %-6s %s\n' "$transport" "$rtt" "$loss" "$tps" "$ideal" "$ratio" "$runs_on"
    stop
done
