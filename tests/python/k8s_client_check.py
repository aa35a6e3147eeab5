"""Independent check of the simulated API server with the official Kubernetes Python client.

Usage: k8s_client_check.py KUBECONFIG POD
Lists the pods (printing NAME IP PHASE READY per pod), then port-forwards to POD's epmd
(4369) and sends a real EPMD NAMES_REQ through the forward, printing epmd's answer.
"""
import socket
import struct
import sys

from kubernetes import client, config
from kubernetes.stream import portforward


def main() -> None:
    kubeconfig, pod = sys.argv[1], sys.argv[2]
    config.load_kube_config(config_file=kubeconfig)
    v1 = client.CoreV1Api()
    for p in v1.list_namespaced_pod("default", label_selector="app=app").items:
        ready = any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
        print(f"pod {p.metadata.name} {p.status.pod_ip} {p.status.phase} ready={ready}")

    pf = portforward(v1.connect_get_namespaced_pod_portforward, pod, "default", ports="4369")
    sock = pf.socket(4369)
    sock.setblocking(True)
    sock.sendall(b"\x00\x01n")  # NAMES_REQ: length 1, code 110
    answer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    epmd_port = struct.unpack(">I", answer[:4])[0]
    print(f"epmd port {epmd_port}")
    print(answer[4:].decode())
    sock.close()
    err = pf.error(4369)
    if err:
        print(f"port-forward error: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
