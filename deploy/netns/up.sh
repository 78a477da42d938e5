#!/usr/bin/env bash
# Brings up a multi-host test bed on this machine: N hosts, each a network namespace at
# 203.0.113.(10+i), joined by a router namespace that gives every host-to-host round trip
# --rtt (each host's link half of it, held by `potluck-netbed delay`: this kernel has no
# netem) and drops --loss of the packets it forwards (nftables numgen). Run it again to
# rebuild; deploy/netns/down.sh takes it down. Root, iproute2 and nftables.
#
#   deploy/netns/up.sh --hosts 5 --rtt 40ms --loss 0.5%
#   ip netns exec pb1 target/debug/potluck coordinator --listen /ip4/203.0.113.11/tcp/7470 ...
#   ip netns exec pb2 target/debug/potluck node --bootstrap /ip4/203.0.113.11/tcp/7470/p2p/ID
#   deploy/netns/down.sh
set -euo pipefail
hosts=3 rtt=0 loss=0 prefix=pb
bin=${POTLUCK_NETBED:-$(dirname "$0")/../../target/debug/potluck-netbed}
while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) hosts=$2; shift 2 ;;
        --rtt) rtt=${2%ms}; shift 2 ;;
        --loss) loss=${2%\%}; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        *) echo "usage: $0 [--hosts N] [--rtt MSms] [--loss PCT%] [--prefix P]" >&2; exit 2 ;;
    esac
done
[[ "$hosts" =~ ^[0-9]+$ && "$hosts" -ge 1 && "$hosts" -le 200 ]] || { echo "--hosts: 1 to 200" >&2; exit 2; }
[[ "$rtt" =~ ^[0-9]+$ ]] || { echo "--rtt: whole milliseconds, even (each link takes half)" >&2; exit 2; }
[[ "$loss" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "--loss: a percentage" >&2; exit 2; }
[ -x "$bin" ] || { echo "no $bin: cargo build -p potluck --bin potluck-netbed (or set POTLUCK_NETBED)" >&2; exit 2; }
"$(dirname "$0")/down.sh" --prefix "$prefix"
router=${prefix}r
gateway=192.0.2.1
ip netns add "$router"
ip netns exec "$router" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
# Drops are per forwarded packet, in both directions.
per10k=$(awk -v l="$loss" 'BEGIN { printf "%d", l * 100 }')
if [ "$per10k" -gt 0 ]; then
    ip netns exec "$router" nft -f - <<NFT
table ip bed {
  chain lossy {
    type filter hook forward priority 0; policy accept;
    numgen random mod 10000 < $per10k drop
  }
}
NFT
fi
mkdir -p /run/potluck-netbed
for i in $(seq 1 "$hosts"); do
    host=$prefix$i addr=203.0.113.$((10 + i))
    outer=${prefix}o$i inner=${prefix}i$i tun=${prefix}t$i table=$((100 + i))
    ip netns add "$host"
    ip -n "$router" link add "$outer" type veth peer name "$inner" netns "$host"
    ip -n "$router" addr add "$gateway/32" dev "$outer"
    ip -n "$router" link set "$outer" up
    ip -n "$host" link set lo up
    ip -n "$host" addr add "$addr/32" dev "$inner"
    ip -n "$host" link set "$inner" up
    ip -n "$host" route add "$gateway" dev "$inner"
    ip -n "$host" route add default via "$gateway"
    # Into the host through its delaying TUN; what comes back out of the TUN goes on to it.
    ip -n "$router" tuntap add dev "$tun" mode tun
    ip -n "$router" link set "$tun" up
    ip -n "$router" route add "$addr/32" dev "$tun"
    ip -n "$router" route add "$addr/32" dev "$outer" table "$table"
    ip -n "$router" rule add iif "$tun" lookup "$table"
    ip netns exec "$router" "$bin" delay --tun "$tun" --ms $((rtt / 2)) \
        </dev/null >"/run/potluck-netbed/$prefix.$i.log" 2>&1 &
    echo $! >> "/run/potluck-netbed/$prefix.pids"
    # Packets routed into a TUN nobody holds yet are lost: wait until the link is held.
    for _ in $(seq 50); do
        grep -q '^delaying' "/run/potluck-netbed/$prefix.$i.log" 2>/dev/null && break
        sleep 0.1
    done
    grep -q '^delaying' "/run/potluck-netbed/$prefix.$i.log" \
        || { cat "/run/potluck-netbed/$prefix.$i.log" >&2; echo "the delay on $tun did not start" >&2; exit 1; }
    echo "$host $addr"
done
