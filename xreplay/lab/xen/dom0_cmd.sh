#!/bin/sh
# Command server handler in the lab's dom0 (run by `nc -ll -p 7000 -e` per connection).
# Request: one line "SECONDS BASE64-OF-SHELL-SCRIPT". Reply: the script's stdout+stderr,
# then "\n__XREPLAY_RC__ <exit code>\n". After SECONDS the script's whole process group is
# killed (rc 137), so a leftover child cannot hold the connection open.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
read -r secs b64 || exit 0
f=/tmp/xreplay-cmd.$$
echo "$b64" | base64 -d > "$f"
setsid sh "$f" </dev/null 2>&1 &
pid=$!
(
  sleep "$secs" & s=$!
  trap 'kill $s; wait $s; exit 0' TERM
  wait $s && kill -KILL -"$pid"
) </dev/null >/dev/null 2>&1 &
dog=$!
wait "$pid"
rc=$?
kill "$dog" 2>/dev/null
rm -f "$f"
printf '\n__XREPLAY_RC__ %d\n' "$rc"
