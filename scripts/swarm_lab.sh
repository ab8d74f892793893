#!/usr/bin/env bash
# A three-node Docker Swarm on this one machine, for the swarm backend's tests and benchmark:
# three Docker Engines, each in a network namespace of its own with its own address, joined as
# one manager and two workers. Traffic stays inside private namespaces and the host's veth.
#
#   swarm_lab.sh up      starts the lab (idempotent when it already runs) and prints its env
#   swarm_lab.sh down    stops every engine by pid and removes what they left
#   swarm_lab.sh env     prints DSPY_AGENT_SWARM_* for a running lab
#   swarm_lab.sh kill-node NODE    SIGKILLs that node's engine (a node lost)
#   swarm_lab.sh start-node NODE   starts it again; it rejoins the swarm by itself
#
# Why it is built this way:
# - the bridge lives in a namespace of its own: on the host, the main Engine's firewall (FORWARD
#   policy DROP on bridged traffic) would drop traffic between the nodes;
# - each engine starts under `unshare --mount --uts` + `nsenter --net` (`ip netns exec` remounts
#   /sys and dockerd then finds no devices cgroup), with its own hostname so node names differ;
# - this kernel has no IPVS: no ingress routing mesh and no service VIPs here, so the tests use
#   `dnsrr` endpoints and host-mode published ports (the backend supports both modes).
set -euo pipefail
cd "$(dirname "$0")/.."

LAB=${DSPY_AGENT_SWARM_LAB:-/run/dspy-agent-swarm-lab}
DATA=${DSPY_AGENT_SWARM_LAB_DATA:-/var/lib/dspy-agent-swarm-lab}
NODES=(n1 n2 n3)
SUBNET_PREFIX=10.231.0
HOST_ADDR=$SUBNET_PREFIX.1
BRIDGE_NS=dspy-lab-sw
IMAGES=(dspy-agent-test/busybox:latest dspy-agent-test/redis:latest)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
addr_of() { echo "$SUBNET_PREFIX.$((10 + ${1#n}))"; }
sock_of() { echo "unix://$LAB/$1/docker.sock"; }
dk() { local node=$1; shift; docker -H "$(sock_of "$node")" "$@"; }

print_env() {
    echo "DSPY_AGENT_SWARM_MANAGER=$(sock_of n1)"
    echo "DSPY_AGENT_SWARM_NODES=$(for n in "${NODES[@]}"; do printf '%s=%s=%s ' "$n" "$(sock_of "$n")" "$(addr_of "$n")"; done | sed 's/ $//')"
    echo "DSPY_AGENT_SWARM_HOST_ADDR=$HOST_ADDR"
}

running() { dk n1 info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null | grep -qx active; }

network_up() {
    ip netns add "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link add br0 type bridge
    ip -n "$BRIDGE_NS" link set br0 up
    ip -n "$BRIDGE_NS" link set lo up
    for n in "${NODES[@]}"; do
        ip netns add "dspy-lab-$n"
        ip link add "dl-$n" type veth peer name "dl-$n-br"
        ip link set "dl-$n" netns "dspy-lab-$n"
        ip link set "dl-$n-br" netns "$BRIDGE_NS"
        ip -n "$BRIDGE_NS" link set "dl-$n-br" master br0 up
        ip -n "dspy-lab-$n" link set lo up
        ip -n "dspy-lab-$n" link set "dl-$n" name eth0
        ip -n "dspy-lab-$n" addr add "$(addr_of "$n")/24" dev eth0
        ip -n "dspy-lab-$n" link set eth0 up
    done
    # The host's own address on the subnet: host-side probes and tests reach the nodes by it.
    ip link add dl-host type veth peer name dl-host-br
    ip link set dl-host-br netns "$BRIDGE_NS"
    ip -n "$BRIDGE_NS" link set dl-host-br master br0 up
    ip addr add "$HOST_ADDR/24" dev dl-host
    ip link set dl-host up
}

engine_up() {
    local n=$1 dir="$LAB/$1"
    mkdir -p "$dir" "$DATA/$n"
    echo '{}' > "$dir/daemon.json"
    # A fresh mount and UTS namespace (own hostname), inside the node's network namespace.
    setsid unshare --mount --uts --propagation slave \
        nsenter --net="/run/netns/dspy-lab-$n" -- \
        sh -c "hostname lab-$n && exec dockerd \
            --config-file '$dir/daemon.json' \
            --data-root '$DATA/$n' --exec-root '$dir/exec' --pidfile '$dir/dockerd.pid' \
            --host '$(sock_of "$n")' --containerd-namespace 'dspy-lab-$n' \
            --containerd-plugins-namespace 'dspy-lab-$n-plugins' --cgroup-parent '/dspy-lab-$n'" \
        < /dev/null > "$dir/dockerd.log" 2>&1 &
}

wait_engine() {
    local n=$1
    for _ in $(seq 1 120); do
        dk "$n" info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    echo "swarm_lab: the engine of $n did not come up; its log:" >&2
    tail -n 30 "$LAB/$n/dockerd.log" >&2 || true
    return 1
}

up() {
    if running; then print_env; return 0; fi
    down >/dev/null 2>&1 || true
    mkdir -p "$LAB"
    network_up
    for n in "${NODES[@]}"; do engine_up "$n"; done
    # Images go into every engine: no registry is reachable here.
    local images="$LAB/images.tar"
    docker save "${IMAGES[@]}" -o "$images"
    for n in "${NODES[@]}"; do wait_engine "$n"; done
    local loads=()
    for n in "${NODES[@]}"; do dk "$n" load -q -i "$images" >/dev/null & loads+=($!); done
    wait "${loads[@]}"
    rm -f "$images"
    dk n1 swarm init --advertise-addr "$(addr_of n1)" --listen-addr "$(addr_of n1):2377" \
        --default-addr-pool 10.232.0.0/16 >/dev/null
    local token
    token=$(dk n1 swarm join-token -q worker)
    for n in n2 n3; do
        dk "$n" swarm join --token "$token" --advertise-addr "$(addr_of "$n")" \
            --listen-addr "$(addr_of "$n"):2377" "$(addr_of n1):2377" >/dev/null
    done
    for _ in $(seq 1 60); do
        [ "$(dk n1 node ls --format '{{.Status}}' | grep -c Ready)" = 3 ] && break
        sleep 0.5
    done
    print_env
}

down() {
    for n in "${NODES[@]}"; do
        local dir="$LAB/$n"
        [ -f "$dir/dockerd.pid" ] && kill "$(cat "$dir/dockerd.pid")" 2>/dev/null || true
    done
    for n in "${NODES[@]}"; do
        local dir="$LAB/$n"
        for _ in $(seq 1 40); do
            [ -f "$dir/dockerd.pid" ] && kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null || break
            sleep 0.25
        done
    done
    # What a killed engine leaves: processes in the nodes' namespaces and cgroups.
    for n in "${NODES[@]}"; do
        local pids
        pids=$(ip netns pids "dspy-lab-$n" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
        for cg in /sys/fs/cgroup/*/dspy-lab-"$n" /sys/fs/cgroup/dspy-lab-"$n"; do
            [ -d "$cg" ] || continue
            find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        done
    done
    ip link del dl-host 2>/dev/null || true
    for ns in "${NODES[@]/#/dspy-lab-}" "$BRIDGE_NS"; do ip netns del "$ns" 2>/dev/null || true; done
    # Mounts the engines made under their roots (overlay layers, netns files, shm).
    grep -oE " ($LAB|$DATA)[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
    rm -rf "$LAB" "$DATA"
}

kill_node() {
    local n=$1 dir="$LAB/$1"
    kill -9 "$(cat "$dir/dockerd.pid")"
    # Its containerd and containers go too, as when the machine is lost.
    local pids
    pids=$(ip netns pids "dspy-lab-$n" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -f "$dir/dockerd.pid"
}

start_node() {
    local n=$1
    # What the killed engine left in its namespace: its firewall rules (stale port forwards to
    # containers that are gone) and its bridges; a fresh engine makes its own.
    for table in filter nat mangle; do
        ip netns exec "dspy-lab-$n" iptables -t "$table" -F
        ip netns exec "dspy-lab-$n" iptables -t "$table" -X
    done
    for link in $(ip -n "dspy-lab-$n" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1); do
        case "$link" in lo|eth0) ;; *) ip -n "dspy-lab-$n" link del "$link" 2>/dev/null || true ;; esac
    done
    grep -oE " $LAB/$n/exec[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
    rm -rf "$LAB/$n/exec"
    engine_up "$n"
    wait_engine "$n"
}

case "${1:-}" in
    kill-node) kill_node "$2" ;;
    start-node) start_node "$2" ;;
    up) as_root true; up ;;
    down) down ;;
    env) running && print_env ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
