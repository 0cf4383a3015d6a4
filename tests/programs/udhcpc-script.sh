#!/bin/sh
# busybox udhcpc script for test guests: apply the lease (address, router,
# MTU) and record every variable udhcpc passes, so tests can check them.
# RECORD names the file to write.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    {
      echo "event=$1"; echo "ip=$ip"; echo "subnet=$subnet"; echo "mask=$mask"
      echo "router=$router"; echo "dns=$dns"; echo "mtu=$mtu"; echo "domain=$domain"
      echo "search=$search"; echo "lease=$lease"; echo "serverid=$serverid"
    } > "${RECORD:-/dev/null}"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip -4 route replace default via "$r" dev "$interface"; break; done
    ;;
esac
exit 0
