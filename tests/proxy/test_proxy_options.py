"""The proxy's command line as meshlet up and the --workers parent write it (pure): TLS
listeners and upstream TLS round-trip through argv, and ``workers: auto`` resolves to the
cores this process may use."""

from __future__ import annotations

import os

import pytest

import config
from proxy import parse_args
from proxy._workers import worker_argv
from supervisor.daemon.components import component_argvs

MESH = """
mesh:
  proxy:
    listen:
      - 127.0.0.1:8080
      - address: 127.0.0.1:8443
        tls:
          cert_file: certs/a.pem
          key_file: certs/a.key
          certificates: [{hosts: [www.a.test, "*.b.test"], cert_file: certs/b.pem, key_file: certs/b.key}]
    upstream_tls: [{service: api, ca_file: certs/ca.pem, server_name: api.internal}]
"""


def test_auto_is_one_worker_per_core_this_process_may_use(monkeypatch):
    assert config.resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert config.resolve_workers(3) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 7})
    assert config.resolve_workers("auto") == 5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert config.resolve_workers("auto") == 64            # the most mesh.proxy.workers allows
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert config.resolve_workers("auto") == 6


def test_the_proxy_alone_is_one_process_unless_asked():
    assert parse_args([]).workers == 1
    assert parse_args(["--workers", "auto"]).workers == len(os.sched_getaffinity(0))
    assert parse_args(["--workers", "4"]).workers == 4
    with pytest.raises(SystemExit):
        parse_args(["--workers", "two"])


def test_meshlet_up_passes_workers_auto_and_the_tls_items_which_read_back(tmp_path):
    mesh = config.loads(MESH, base_dir=str(tmp_path)).mesh
    assert mesh.proxy.workers == "auto"   # the default
    argv = component_argvs(mesh, "http://127.0.0.1:8500")["proxy"]
    assert argv[argv.index("--workers") + 1] == "auto"
    args = parse_args(argv[argv.index("proxy") + 1:])
    assert args.workers == len(os.sched_getaffinity(0))
    assert tuple(args.listen) == mesh.proxy.listen
    assert args.listen[1].tls.cert_file == str(tmp_path / "certs" / "a.pem")   # the config file's directory
    assert tuple(args.upstream_tls) == mesh.proxy.upstream_tls


def test_workers_get_the_tls_listeners_with_the_ports_the_parent_holds(tmp_path):
    mesh = config.loads(MESH, base_dir=str(tmp_path)).mesh
    argv = component_argvs(mesh, "http://127.0.0.1:8500")["proxy"]
    args = parse_args(argv[argv.index("proxy") + 1:] + ["--workers", "3"])
    held = [config.ProxyListener(address="127.0.0.1:8080"),
            config.ProxyListener(address="127.0.0.1:8443", tls=args.listen[1].tls)]
    w = worker_argv(args, 2, held)
    back = parse_args(w[w.index("proxy") + 1:])
    assert back.listen == held and back.upstream_tls == args.upstream_tls and back.workers == 3


def test_a_relative_path_on_the_command_line_is_the_working_directorys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args(["--listen", "{address: 127.0.0.1:8443, tls: {cert_file: c.pem, key_file: k/k.pem}}",
                       "--upstream-tls", "{service: api, ca_file: ca.pem}"])
    assert args.listen[0].tls.key_file == str(tmp_path / "k" / "k.pem")
    assert args.upstream_tls[0].ca_file == str(tmp_path / "ca.pem")
    with pytest.raises(SystemExit):
        parse_args(["--listen", "127.0.0.1:8443", "--listen", "127.0.0.1:8443"])
