"""Checks of the simulated cluster with the official Kubernetes Python client.

Usage: sim_check.py COMMAND KUBECONFIG ARGS...

  portforward KUBECONFIG POD PORT [SEND]
      Port-forwards to POD:PORT, sends SEND (default: an EPMD NAMES request when PORT is
      4369, else nothing), prints what comes back until the stream closes (at most 10 s), or
      the error (e.g. a 403 on the upgrade). Exit 0 if data came back.
  portforward-hangs KUBECONFIG POD PORT SECONDS
      Starts a port-forward and prints "hung" if the upgrade got no answer within SECONDS.
  watch-raw KUBECONFIG RESOURCE_VERSION TIMEOUT [bookmarks]
      A raw pod watch (what the server sends, line by line) from RESOURCE_VERSION.
  list KUBECONFIG
      Lists the pods of the default namespace (name, uid, IP).
  watch-resume KUBECONFIG RESOURCE_VERSION
      watch.Watch().stream() from RESOURCE_VERSION (the client's own 410 handling); prints
      the ApiException it ends with, then relists and prints each pod's name, uid and IP.
"""
import ast
import json
import struct
import sys
import threading

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.stream import portforward


def api(kubeconfig):
    config.load_kube_config(config_file=kubeconfig)
    return client.CoreV1Api()


def refusal(e):
    """The Status in a refused WebSocket upgrade (websocket-client puts the body last in its
    message, as text or as a bytes literal)."""
    text = str(e.reason)
    body = text.rsplit("-+-+- ", 1)[-1].strip()
    try:
        if body.startswith("b'") or body.startswith('b"'):
            body = ast.literal_eval(body).decode()
        status = json.loads(body)
        return f"{status.get('code')} {status.get('reason')}: {status.get('message')}"
    except Exception:
        return text


def cmd_portforward(kubeconfig, pod, port, send=None):
    v1 = api(kubeconfig)
    port = int(port)
    try:
        pf = portforward(v1.connect_get_namespaced_pod_portforward, pod, "default", ports=str(port))
    except ApiException as e:
        print(f"portforward refused: {refusal(e)}")
        sys.exit(2)
    sock = pf.socket(port)
    sock.settimeout(10)
    if send is not None:
        sock.sendall(send.encode())
    elif port == 4369:
        sock.sendall(b"\x00\x01n")  # EPMD NAMES_REQ
    answer = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except Exception as e:  # timeout: print what came so far
        print(f"(stopped reading: {e})")
    if port == 4369 and len(answer) >= 4:
        print(f"epmd port {struct.unpack('>I', answer[:4])[0]}")
        answer = answer[4:]
    print("received: " + answer.decode(errors="replace"))
    err = pf.error(port)
    if err:
        print(f"port-forward error: {err}")
    sock.close()
    sys.exit(0 if answer else 1)


def cmd_portforward_hangs(kubeconfig, pod, port, seconds):
    v1 = api(kubeconfig)
    done = []

    def go():
        try:
            portforward(v1.connect_get_namespaced_pod_portforward, pod, "default", ports=str(port))
            done.append("upgraded")
        except Exception as e:
            done.append(f"failed: {e}")

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(float(seconds))
    print("hung" if not done else done[0], flush=True)


def cmd_watch_raw(kubeconfig, rv, timeout, bookmarks=None):
    v1 = api(kubeconfig)
    resp = v1.list_namespaced_pod(
        "default",
        watch=True,
        resource_version=rv,
        timeout_seconds=int(timeout),
        allow_watch_bookmarks=bookmarks == "bookmarks",
        _preload_content=False,
    )
    for line in resp.stream():
        for l in line.decode().splitlines():
            if l.strip():
                ev = json.loads(l)
                print(f"{ev['type']} {json.dumps(ev['object'], sort_keys=True)}", flush=True)


def cmd_watch_resume(kubeconfig, rv):
    v1 = api(kubeconfig)
    w = watch.Watch()
    try:
        for ev in w.stream(v1.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=10):
            print(f"event {ev['type']} {ev['object'].metadata.name}", flush=True)
        print("watch ended without an error")
    except ApiException as e:
        print(f"ApiException status={e.status} reason={e.reason}", flush=True)
    pods = v1.list_namespaced_pod("default")
    print(f"relisted at {pods.metadata.resource_version}")
    for p in pods.items:
        print(f"pod {p.metadata.name} {p.metadata.uid} {p.status.pod_ip}")


def cmd_list(kubeconfig):
    v1 = api(kubeconfig)
    for p in v1.list_namespaced_pod("default").items:
        print(f"pod {p.metadata.name} {p.metadata.uid} {p.status.pod_ip}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "portforward": cmd_portforward,
        "portforward-hangs": cmd_portforward_hangs,
        "watch-raw": cmd_watch_raw,
        "watch-resume": cmd_watch_resume,
        "list": cmd_list,
    }[cmd](*args)


if __name__ == "__main__":
    main()
