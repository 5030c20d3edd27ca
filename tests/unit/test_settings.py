"""Settings: defaults in one place, TOML + environment, errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import settings

POOL = """
[[pools]]
name = "sglang"
engine = "sglang"
role = "interactive"
models = ["m"]
endpoints = ["http://127.0.0.1:30000"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return str(path)


def test_shipped_example_config_loads():
    s = settings.load(str(Path(__file__).resolve().parents[2] / "gateway" / "example.toml"), environ={})
    assert {p.role for p in s.pools} == {"interactive", "batch"}
    assert s.models() == ["llama-3.1-8b"]


def test_defaults_apply_when_keys_are_absent(tmp_path):
    s = settings.load(write(tmp_path, POOL), environ={})
    assert s.limits.max_body_bytes == 16 * 1024 * 1024
    assert s.pools[0].effective_policy == "prefix"
    assert s.admin.host == "127.0.0.1"


def test_a_pool_may_take_its_replicas_from_a_dns_srv_name_instead_of_a_list(tmp_path):
    text = POOL.replace('endpoints = ["http://127.0.0.1:30000"]', 'srv = "_http._tcp.engines.inference.svc"')
    s = settings.load(write(tmp_path, text + '[discovery]\nnameservers = ["10.96.0.10", "[fd00::a]:5353"]\n'),
                      environ={})
    assert (s.pools[0].srv, s.pools[0].endpoints) == ("_http._tcp.engines.inference.svc", [])
    assert [settings.nameserver(n) for n in s.discovery.nameservers] == [("10.96.0.10", 53), ("fd00::a", 5353)]


def test_gossip_peers_may_be_ipv6_addresses_in_brackets_once_the_listener_is_ipv6(tmp_path):
    peers = '["[fd00::7]:7946", "10.0.0.8:7946", "edge-gateway-peers.edge-gateway:7946"]'
    s = settings.load(write(tmp_path, POOL + f'[gossip]\nhost = "::"\npeers = {peers}\n'), environ={})
    assert [settings.peer_address(p) for p in s.gossip.peers] == [
        ("fd00::7", 7946), ("10.0.0.8", 7946), ("edge-gateway-peers.edge-gateway", 7946)]


def test_settings_are_frozen(tmp_path):
    s = settings.load(write(tmp_path, POOL), environ={})
    with pytest.raises(AttributeError):
        s.region = "elsewhere"  # type: ignore[misc]


def test_environment_overrides_nested_keys_and_list_items(tmp_path):
    env = {
        "EDGE_GATEWAY__TIMEOUTS__CONNECT_S": "0.5",
        "EDGE_GATEWAY__LISTEN__PORT": "8123",
        "EDGE_GATEWAY__POOLS__0__ENDPOINTS": '["http://10.0.0.7:30000", "http://10.0.0.8:30000"]',
        "EDGE_GATEWAY__REGION": "eu-west-1",
        "UNRELATED": "x",
    }
    s = settings.load(write(tmp_path, POOL), environ=env)
    assert s.timeouts.connect_s == 0.5
    assert s.listen.port == 8123
    assert s.region == "eu-west-1"
    assert s.pools[0].endpoints == ["http://10.0.0.7:30000", "http://10.0.0.8:30000"]


@pytest.mark.parametrize("text, key", [
    ("[timeouts]\nconnect_s = 'soon'\n", "timeouts.connect_s"),
    ("[timeouts]\nconnect_z = 1\n", "connect_z"),
    ("[listen]\nport = 70000\n", "listen.port"),
    ("[routing]\nload_factor = 0.5\n", "routing.load_factor"),
    ("[routing]\nring_load_factor = 0.99\n", "routing.ring_load_factor"),
    ("[limits]\nmax_body_bytes = 0\n", "limits.max_body_bytes"),
    ("[health]\nkv_saturation = 1.5\n", "health.kv_saturation"),
    ("[health]\nkv_saturation = 0\n", "health.kv_saturation"),
    (POOL.replace("http://127.0.0.1:30000", "127.0.0.1:30000"), "pools[0].endpoints[0]"),
    (POOL.replace('engine = "sglang"', 'engine = "trt"'), "pools[0].engine"),
    (POOL + POOL, "pools[1].name"),
    (POOL + 'srv = "_http._tcp.engines.inference.svc"\n', "pools[0].srv"),
    (POOL + "hedge_after_s = 0\n", "pools[0].hedge_after_s"),
    ("[timeouts]\nfirst_byte_s = 5\n" + POOL + "hedge_after_s = 5\n", "pools[0].hedge_after_s"),
    (POOL.replace('endpoints = ["http://127.0.0.1:30000"]', 'srv = "engines.inference.svc"'), "pools[0].srv"),
    (POOL.replace('endpoints = ["http://127.0.0.1:30000"]', ''), "pools[0].endpoints"),
    (POOL + '[discovery]\nnameservers = ["dns.local:53"]\n', "discovery.nameservers[0]"),
    ('[discovery]\ninterval_s = 0\n', "discovery.interval_s"),
    ('[gossip]\npeers = ["10.0.0.7"]\n', "gossip.peers[0]"),
    ('[gossip]\npeers = ["gateways.inference:http"]\n', "gossip.peers[0]"),
    ('[gossip]\npeers = ["fd00::7:7946"]\n', "gossip.peers[0]"),
    ('[gossip]\npeers = ["[fd00::7]:7946"]\n', "gossip.peers[0]"),  # an IPv6 peer, an IPv4 listener
    ('workers = 4\n[gossip]\nport = 65534\n', "gossip.port"),
    ('[gossip]\ninterval_s = 0\n', "gossip.interval_s"),
    ('[gossip]\nmax_datagram_bytes = 100\n', "gossip.max_datagram_bytes"),
    ('[logging]\nmax_pending_bytes = 0\n', "logging.max_pending_bytes"),
])
def test_invalid_config_fails_fast_naming_the_bad_key(tmp_path, text, key):
    with pytest.raises(settings.SettingsError) as e:
        settings.load(write(tmp_path, text), environ={})
    message = str(e.value)
    assert key.replace("[", ".").replace("]", "").split(".")[-1] in message.replace("[", ".").replace("]", "")
    if "." in key and not key.startswith("pools"):
        assert key.split(".")[0] in message


def test_the_command_lines_workers_overrides_the_file_and_the_environment_and_is_validated(tmp_path):
    path = write(tmp_path, "workers = 1\n[gossip]\nport = 65534\n" + POOL)
    s = settings.load(path, environ={"EDGE_GATEWAY__WORKERS": "2"})
    assert s.workers == 2
    assert settings.load(path, environ={"EDGE_GATEWAY__WORKERS": "3"}, workers=1).workers == 1
    with pytest.raises(settings.SettingsError, match="gossip.port"):  # worker 2 would need port 65536
        settings.load(path, environ={}, workers=3)


def test_bad_environment_override_names_the_key(tmp_path):
    with pytest.raises(settings.SettingsError, match="connect_s"):
        settings.load(write(tmp_path, POOL), environ={"EDGE_GATEWAY__TIMEOUTS__CONNECT_S": "fast"})


def test_cli_exits_2_with_message_on_bad_config(tmp_path):
    import subprocess
    import sys

    path = write(tmp_path, "[listen]\nport = -1\n")
    out = subprocess.run([sys.executable, "-m", "gateway", "--config", path], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "listen.port" in out.stderr
