#!/usr/bin/env bash
# The C client (kvctl) against a real server on a free loopback port:
# streaming, submit/step/cancel, agents export/import, health, tokens, TLS.
#   kvctl_test.sh KVSERVE KVCTL MODEL_DIR
# Nothing here depends on the machine's speed: a request that must still be
# running when it is cancelled is held by the test hook KVSERVE_TEST_HOLD_FILE
# (docs/testing.md), and every wait polls a condition with a generous bound.
set -u
kvserve=$1 kvctl=$2 model=$3
tmp=$(mktemp -d)
pass=0 fail=0
check() { # name, command...
  local name=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok   $name"; else fail=$((fail + 1)); echo "FAIL $name"; fi
}
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # extra server args...
  local attempt until
  for attempt in 1 2 3 4 5; do # another process may take the "free" port first: then another one
    port=$(free_port)
    KVSERVE_TEST_HOLD_FILE=$tmp/hold "$kvserve" serve --model "$model" --listen "127.0.0.1:$port" "$@" \
      2>"$tmp/server.log" &
    pid=$!
    until=$((SECONDS + 120))
    while ((SECONDS < until)); do
      "$kvctl" --addr "127.0.0.1:$port" "${client_args[@]}" --timeout 2 health 2>/dev/null | grep -qx SERVING &&
        return 0
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null || ! grep -q "cannot listen" "$tmp/server.log"; then break; fi
  done
  echo "server did not become SERVING within 120 s:"; cat "$tmp/server.log"; return 1
}
hold() { echo "$1" >"$tmp/hold.new" && mv "$tmp/hold.new" "$tmp/hold"; } # requests stop at $1 tokens
release() { rm -f "$tmp/hold"; }
step_until() { # ID PATTERN OUT: Step (long-polling) until OUT has a line matching PATTERN; 120 s at most
  local until=$((SECONDS + 120))
  while ((SECONDS < until)); do
    "${K[@]}" step --wait 1000 "$1" >>"$3" 2>&1
    grep -q "$2" "$3" && return 0
  done
  echo "no line matching '$2' for request $1 within 120 s:"; cat "$3"; return 1
}
stop() { kill -TERM "$pid"; wait "$pid"; }
trap 'kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT

client_args=()
start
K=("$kvctl" --addr "127.0.0.1:$port" --timeout 30)

out=$("${K[@]}" generate -n 12 --ignore-eos --agent a1 "Hello there" 2>"$tmp/err")
check "generate streams text and usage" grep -q "finish length | prompt [0-9]* (cached 0) | generated 12" "$tmp/err"
"${K[@]}" generate -n 4 --ignore-eos --agent a1 " again" 2>"$tmp/err2" >/dev/null
check "agent resume reports cached tokens" grep -q "(cached 1[0-9])" "$tmp/err2"
id=$("${K[@]}" submit -n 8 --ignore-eos "Tell me")
step_until "$id" "^done id=$id" "$tmp/step1"
check "submit and step until done" grep -q "^done id=$id finish=length .* generated=8" "$tmp/step1"
check "step of a collected id is NOT_FOUND" bash -c "! '${K[0]}' --addr 127.0.0.1:$port step $id 2>&1 | grep -qv NOT_FOUND"
hold 2 # the next request generates 2 tokens, then waits (running, holding its blocks) until released
id=$("${K[@]}" submit -n 480 --ignore-eos "x")
step_until "$id" "^token id=$id index=1 " "$tmp/step2"
check "the held request is running" bash -c "'${K[0]}' --addr 127.0.0.1:$port stats | grep -qx 'running 1'"
check "cancel a running request" "${K[@]}" cancel "$id"
step_until "$id" "^done id=$id" "$tmp/step2"
check "the cancelled request completes as cancelled" grep -q "^done id=$id finish=cancelled .* generated=2 " "$tmp/step2"
release
check "export an agent" "${K[@]}" agents export a1 "$tmp/a1.bin"
check "drop it" "${K[@]}" agents drop a1
check "dropping again is NOT_FOUND" bash -c "'${K[0]}' --addr 127.0.0.1:$port agents drop a1 2>&1 | grep -q NOT_FOUND"
check "import it back" "${K[@]}" agents import a1 "$tmp/a1.bin"
check "list shows it" bash -c "'${K[0]}' --addr 127.0.0.1:$port agents list | grep -q '^a1 tokens=[0-9]'"
check "health is SERVING" bash -c "'${K[0]}' --addr 127.0.0.1:$port health | grep -qx SERVING"
check "bad request: INVALID_ARGUMENT" bash -c "'${K[0]}' --addr 127.0.0.1:$port generate -n 0 hi 2>&1 | grep -q 'INVALID_ARGUMENT: max_tokens'"
"${K[@]}" stats >"$tmp/stats"
free=$(awk '/^blocks_free/{print $2}' "$tmp/stats") used=$(awk '/^blocks_used/{print $2}' "$tmp/stats")
running=$(awk '/^running/{print $2}' "$tmp/stats")
# only the agent a1 (imported: 2 blocks) holds blocks now
check "stats: only the agent's blocks are in use" test "$running" = 0 -a "$used" = 2
check "load: 8 concurrent streams" "${K[@]}" load --concurrency 8 --requests 16 -n 8 --ignore-eos "hi"
stop
check "SIGTERM exits 0" test $? -eq 0

# bearer tokens
printf 'tok-alice alice\ntok-bob bob\n' >"$tmp/tokens"
start --token-file "$tmp/tokens"
check "no token: UNAUTHENTICATED" bash -c "'$kvctl' --addr 127.0.0.1:$port stats 2>&1 | grep -q UNAUTHENTICATED"
check "wrong token: UNAUTHENTICATED" bash -c "'$kvctl' --addr 127.0.0.1:$port --token nope stats 2>&1 | grep -q UNAUTHENTICATED"
"$kvctl" --addr "127.0.0.1:$port" --token tok-alice generate -n 3 --agent secret "hi" >/dev/null 2>&1
check "alice sees her agent" "$kvctl" --addr "127.0.0.1:$port" --token tok-alice agents get secret
check "bob does not" bash -c "'$kvctl' --addr 127.0.0.1:$port --token tok-bob agents get secret 2>&1 | grep -q NOT_FOUND"
check "health needs no token" "$kvctl" --addr "127.0.0.1:$port" health
stop

# TLS and mTLS
(cd "$tmp" &&
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=kvserve-test-ca 2>/dev/null &&
  openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null &&
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >ext &&
  openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null &&
  openssl req -newkey rsa:2048 -nodes -keyout cli.key -out cli.csr -subj /CN=client 2>/dev/null &&
  openssl x509 -req -in cli.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cli.pem -days 2 2>/dev/null)
client_args=(--ca "$tmp/ca.pem")
start --tls-cert "$tmp/srv.pem" --tls-key "$tmp/srv.key"
check "TLS: verified channel works" "$kvctl" --addr "127.0.0.1:$port" --ca "$tmp/ca.pem" stats
check "TLS: plaintext client fails" bash -c "! '$kvctl' --addr 127.0.0.1:$port --timeout 3 stats >/dev/null 2>&1"
stop
client_args=(--ca "$tmp/ca.pem" --cert "$tmp/cli.pem" --key "$tmp/cli.key")
start --tls-cert "$tmp/srv.pem" --tls-key "$tmp/srv.key" --tls-client-ca "$tmp/ca.pem"
check "mTLS: client certificate accepted" "$kvctl" --addr "127.0.0.1:$port" "${client_args[@]}" stats
check "mTLS: no client certificate refused" bash -c "! '$kvctl' --addr 127.0.0.1:$port --ca $tmp/ca.pem --timeout 3 stats >/dev/null 2>&1"
stop
echo garbage >"$tmp/bad.pem"
check "bad PEM: one-line error" bash -c "'$kvserve' serve --model '$model' --listen 127.0.0.1:0 --tls-cert $tmp/bad.pem --tls-key $tmp/srv.key 2>&1 | grep -q 'not a valid PEM'"
"$kvserve" serve --model "$model" --listen 127.0.0.1:0 --tls-cert "$tmp/bad.pem" --tls-key "$tmp/srv.key" 2>/dev/null
check "bad PEM exit code" test $? -ne 0
"$kvserve" serve --model /nonexistent --listen 127.0.0.1:0 2>"$tmp/e"
check "bad model dir: error and exit code" bash -c "grep -q '/nonexistent/config.json' $tmp/e"
echo "kvctl: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
