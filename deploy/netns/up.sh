#!/usr/bin/env bash
# Brings up a multi-host test bed on this machine: N hosts, each a network namespace at
# 203.0.113.(10+i), joined by a router namespace that gives every host-to-host round trip
# --rtt (each host's link half of it, held by `potluck-netbed delay`: this kernel has no
# netem) and drops --loss of the packets it forwards (nftables numgen). Run it again to
# rebuild; deploy/netns/down.sh takes it down. Root, iproute2 and nftables.
#
# Each --home (repeatable) adds a home LAN: one more host of the bed becomes its NAT router
# (its address the home's public one), with a host behind it at 198.51.100.2 (namespace
# <prefix>h<k>), which nobody outside the home can reach. Its kind:
#   ei         endpoint-independent mapping (a LAN port keeps its public port), and only
#              the address and port a LAN connection went to may answer (port-restricted,
#              Linux's own conntrack);
#   cone       the same mapping, and any port of an address the LAN sent to may reach the
#              LAN port (address-restricted cone, as many home routers);
#   symmetric  a random public port for every connection.
# The router drops unsolicited packets unanswered, as home routers do.
#
#   deploy/netns/up.sh --hosts 5 --rtt 40ms --loss 0.5% --home ei --home symmetric
#   ip netns exec pb1 target/debug/potluck coordinator --listen /ip4/203.0.113.11/tcp/7470 ...
#   ip netns exec pb2 target/debug/potluck node --bootstrap /ip4/203.0.113.11/tcp/7470/p2p/ID
#   deploy/netns/down.sh
set -euo pipefail
hosts=3 rtt=0 loss=0 prefix=pb homes=()
bin=${POTLUCK_NETBED:-$(dirname "$0")/../../target/debug/potluck-netbed}
while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) hosts=$2; shift 2 ;;
        --rtt) rtt=${2%ms}; shift 2 ;;
        --loss) loss=${2%\%}; shift 2 ;;
        --prefix) prefix=$2; shift 2 ;;
        --home) case "$2" in
                ei|cone|symmetric) homes+=("$2") ;;
                *) echo "--home: ei, cone or symmetric" >&2; exit 2 ;;
            esac; shift 2 ;;
        *) echo "usage: $0 [--hosts N] [--rtt MSms] [--loss PCT%] [--prefix P] [--home ei|cone|symmetric]..." >&2; exit 2 ;;
    esac
done
[[ "$hosts" =~ ^[0-9]+$ && "$hosts" -ge 1 && "$hosts" -le 200 ]] || { echo "--hosts: 1 to 200" >&2; exit 2; }
[ "${#homes[@]}" -le 20 ] || { echo "--home: at most 20" >&2; exit 2; }
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
# The homes' routers are hosts of the bed too, after the others.
for i in $(seq 1 $((hosts + ${#homes[@]}))); do
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

# Each home: a LAN behind host (hosts + k), masquerading out of its link to the router.
for k in $(seq 1 "${#homes[@]}"); do
    wan_host=$prefix$((hosts + k)) wan=${prefix}i$((hosts + k))
    home=${prefix}h$k lan=${prefix}l$k inner=${prefix}m$k
    kind=${homes[$((k - 1))]} masquerade=masquerade cone=""
    [ "$kind" = symmetric ] && masquerade="masquerade fully-random"
    # A cone lets in what comes from any address the LAN sent to, at the LAN's own port
    # (the mapping kept it), whatever the port it comes from.
    [ "$kind" = cone ] && cone="
  set sent_to { type ipv4_addr; flags dynamic,timeout; timeout 2m; }
  chain remember { type filter hook forward priority filter - 1; iifname \"$lan\" update @sent_to { ip daddr }; }
  chain open { type nat hook prerouting priority dstnat; iifname \"$wan\" ip saddr @sent_to dnat to 198.51.100.2; }"
    ip netns add "$home"
    ip -n "$wan_host" link add "$lan" type veth peer name "$inner" netns "$home"
    ip -n "$wan_host" addr add 198.51.100.1/24 dev "$lan"
    ip -n "$wan_host" link set "$lan" up
    ip -n "$home" link set lo up
    ip -n "$home" addr add 198.51.100.2/24 dev "$inner"
    ip -n "$home" link set "$inner" up
    ip -n "$home" route add default via 198.51.100.1
    ip netns exec "$wan_host" sysctl -qw net.ipv4.ip_forward=1
    # Out of the LAN, masqueraded; in, only what answers the LAN's own connections (and,
    # for a cone, what it opened to); what nobody asked for is dropped, not reset (a reset
    # ends a hole punch whose other side's packet is a moment late).
    ip netns exec "$wan_host" nft -f - <<NFT
table ip home {$cone
  chain masq { type nat hook postrouting priority srcnat; oifname "$wan" $masquerade; }
  chain guard { type filter hook forward priority filter; policy drop;
    iifname "$lan" accept; ct state established,related accept; ct status dnat accept; }
  chain stealth { type filter hook input priority filter; policy accept;
    iifname "$wan" ct state new drop; }
}
NFT
    echo "$home 198.51.100.2 behind $wan_host 203.0.113.$((10 + hosts + k)) $kind"
done
