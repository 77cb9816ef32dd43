"""The policy server: the client's contract is load_policy(path).predict's; bad clients never stop the server."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

import vlapt  # noqa: E402,F401
from vlapt.cli.main import main  # noqa: E402
from vlapt.envs import get_suite  # noqa: E402
from vlapt.evaluation import CheckpointAgent, EvalConfig, evaluate  # noqa: E402
from vlapt.policies import load_policy  # noqa: E402
from vlapt.serving import PolicyClient, PolicyServer, ProtocolError, RemotePolicyAgent, ServeConfig  # noqa: E402
from vlapt.serving.protocol import pack, unpack  # noqa: E402

SRC = Path(vlapt.__file__).parents[1]
INSTRUCTION = get_suite("mt10").instruction("reach-v3")


def observation(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "proprio": rng.normal(size=4).astype(np.float32), "instruction": INSTRUCTION}


def batch(n=3, seed=0):
    rows = [observation(seed + i) for i in range(n)]
    return {"image": np.stack([r["image"] for r in rows]), "proprio": np.stack([r["proprio"] for r in rows]),
            "instruction": [r["instruction"] for r in rows]}


@pytest.fixture
def policy(tiny_policy_dir):
    return load_policy(tiny_policy_dir)


@pytest.fixture
def server(policy):
    with PolicyServer(policy, port=0, max_message_bytes=64 * 1024, max_batch=4) as running:
        yield running


def _until_no_clients(server, timeout: float = 10.0) -> None:
    """Wait for the server to let go of connections its clients have closed (it learns of a close a moment later)."""
    deadline = time.monotonic() + timeout
    while server.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)


def _healthy(server, policy):
    """The server still answers a good request correctly."""
    with PolicyClient(server.url) as client:
        np.testing.assert_array_equal(client.predict(observation(7)), policy.predict(observation(7)))


# -- the wire format ---------------------------------------------------------------------------------
def test_messages_round_trip_arrays_of_every_plain_dtype():
    message = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((2, 0), np.uint8), "c": [True, "x"],
               "d": np.bool_(True), "e": np.arange(3, dtype=np.int64)[::2], "f": np.float64(1.5)}
    out = unpack(pack(message))
    for key in ("a", "b", "e"):
        np.testing.assert_array_equal(out[key], message[key])
        assert out[key].dtype == message[key].dtype and out[key].flags.writeable
    assert out["c"] == [True, "x"] and out["d"] is np.True_ and out["f"] == 1.5


@pytest.mark.parametrize("bad, match", [
    (b"\xc1garbage", "not a msgpack"),
    ("a text frame", "text frame"),
    (pack({b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}), "does not match"),
    (pack({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}), "dtype"),
    (pack({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "no such", b"shape": [1]}), "dtype"),
    (pack({b"__ndarray__": True, b"data": b"\0" * 4, b"dtype": "<f4", b"shape": [-1]}), "shape"),
    (pack({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [1] * 40}), "shape"),
])
def test_malformed_messages_are_protocol_errors(bad, match):
    with pytest.raises(ProtocolError, match=match):
        unpack(bad)


def test_object_arrays_cannot_be_sent():
    with pytest.raises(ValueError, match="dtype object"):
        pack({"x": np.array([object()])})


# -- good requests -------------------------------------------------------------------------------------
def test_client_predict_is_load_policy_predict(server, policy, tiny_policy_dir):
    with PolicyClient(server.url) as client:
        assert client.chunk_len == policy.chunk_len and client.action_dim == policy.action_dim
        assert client.policy_type == "vla" and client.metadata["name"] == ""
        assert client.observation_config() == policy.observation_config()
        for seed in range(3):
            remote, local = client.predict(observation(seed)), policy.predict(observation(seed))
            assert remote.dtype == local.dtype == np.float32 and remote.shape == local.shape == (policy.chunk_len, 4)
            np.testing.assert_array_equal(remote, local)
        remote = client.predict_batch(batch(4))
        assert remote.shape == (4, policy.chunk_len, 4) and remote.dtype == np.float32
        np.testing.assert_array_equal(remote, policy.predict_batch(batch(4)))
        # plain Python values travel as numpy would read them in-process
        as_lists = {**observation(1), "proprio": observation(1)["proprio"].tolist()}
        np.testing.assert_array_equal(client.predict(as_lists), policy.predict(observation(1)))
        # sampled chunks follow the server's seeded stream, as the in-process policy's do
        fresh = load_policy(tiny_policy_dir, seed=0)
        np.testing.assert_array_equal(client.predict(observation(2), deterministic=False),
                                      fresh.predict(observation(2), deterministic=False))


def test_a_batch_over_max_batch_is_split_as_in_process_reads_it(server, policy):
    rows = batch(9)
    shared = {**rows, "instruction": INSTRUCTION}  # one instruction for every row

    def in_process(observations, per_row):  # the same split into requests of at most 4, in-process
        return np.concatenate([policy.predict_batch({k: v[s:s + 4] if k in per_row else v for k, v in observations.items()})
                               for s in range(0, 9, 4)])

    with PolicyClient(server.url) as client:
        assert client.max_batch == 4
        np.testing.assert_array_equal(client.predict_batch(rows), in_process(rows, ("image", "proprio", "instruction")))
        np.testing.assert_array_equal(client.predict_batch(shared), in_process(shared, ("image", "proprio")))
        np.testing.assert_allclose(client.predict_batch(shared), policy.predict_batch(shared), atol=1e-6)


def test_a_batch_over_the_message_limit_is_sent_in_requests_that_fit(policy):
    rows = batch(9)  # 9 x 3 KiB of images, over a 12 KiB message limit: three requests of three rows each
    with PolicyServer(policy, port=0, max_message_bytes=12 * 1024, max_batch=8) as server:
        with PolicyClient(server.url) as client:
            assert client._rows_per_request(rows, 9) == 3
            assert client._rows_per_request({**rows, "image": list(rows["image"])}, 9) == 3, "a list of images too"
            np.testing.assert_allclose(client.predict_batch(rows), policy.predict_batch(rows), atol=1e-6)
            assert client.predict(observation(3)).shape == (client.chunk_len, client.action_dim)


def test_a_timed_out_request_closes_the_connection_so_no_late_answer_is_taken_for_the_next(server, policy, monkeypatch):
    predict, calls = policy.predict, []

    def slow_first(observation, deterministic=True):
        calls.append(observation)
        if len(calls) == 1:
            time.sleep(1.5)
        return predict(observation, deterministic=deterministic)

    monkeypatch.setattr(policy, "predict", slow_first)
    with PolicyClient(server.url, timeout=0.5) as client:
        with pytest.raises(ConnectionError, match="did not answer within 0.5 s"):
            client.predict(observation(0))
        with pytest.raises(ConnectionError, match="make a new PolicyClient"):
            client.predict(observation(1))
    _healthy(server, policy)


def test_a_server_with_incomplete_metadata_is_a_clear_error():
    from websockets.sync.server import serve

    from vlapt.serving.protocol import PROTOCOL

    with serve(lambda connection: connection.send(pack({"protocol": PROTOCOL})), "127.0.0.1", 0) as fake:
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        port = fake.socket.getsockname()[1]
        with pytest.raises(ConnectionError, match="incomplete metadata.*chunk_len"):
            PolicyClient(f"ws://127.0.0.1:{port}", timeout=5)


def test_server_binds_to_loopback_by_default(policy):
    assert ServeConfig().host == "127.0.0.1"
    with PolicyServer(policy, port=0) as running:
        assert running._server.socket.getsockname()[0] == "127.0.0.1"
        assert running.url.startswith("ws://127.0.0.1:")


# -- bad requests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (lambda o: {k: v for k, v in o.items() if k != "proprio"}, "missing \\['proprio'\\]"),
    (lambda o: {**o, "image": o["image"].astype(np.float32)}, "uint8"),
    (lambda o: {**o, "image": o["image"][:16]}, "shape"),
    (lambda o: {**o, "proprio": np.zeros(7, np.float32)}, "proprio"),
    (lambda o: {**o, "proprio": np.full(4, np.nan, np.float32)}, "NaN"),
    (lambda o: {**o, "instruction": ""}, "empty"),
    (lambda o: {**o, "instruction": 3}, "must be a str"),
    (lambda o: {**o, "image": o["image"][None].repeat(2, 0)}, "predict_batch"),
])
def test_bad_observations_get_the_error_predict_raises_and_the_connection_stays(server, policy, change, match):
    bad = change(observation())
    with pytest.raises(ValueError, match=match) as local:
        policy.predict(bad)
    with PolicyClient(server.url) as client:
        with pytest.raises(ValueError, match=match) as remote:
            client.predict(bad)
        assert str(remote.value) == str(local.value)
        np.testing.assert_array_equal(client.predict(observation()), policy.predict(observation()))


def test_malformed_requests_get_error_replies(server, policy):
    from websockets.sync.client import connect

    with connect(server.url, compression=None) as raw:
        unpack(raw.recv(timeout=10))  # metadata
        for message, match in [(b"\x00\xc1\xff", "not a msgpack"), ("hello", "text frame"),
                               (pack([1, 2, 3]), "a request is a map"), (pack({"method": "train"}), "unknown method"),
                               (pack({"method": "predict"}), "no 'observation'"),
                               (pack({"observation": observation(), "deterministic": "yes"}), "deterministic"),
                               (pack({"method": "predict_batch", "observation": batch(5)}), "max_batch"),
                               (pack({"method": "predict_batch",  # nested lists, as a client without numpy sends
                                      "observation": {**batch(5), "image": np.zeros((5, 8, 8, 3), int).tolist()}}),
                                "max_batch")]:
            raw.send(message)
            reply = unpack(raw.recv(timeout=10))
            assert re.search(match, reply["error"]["message"]), (match, reply)
        raw.send(pack({"observation": observation()}))
        np.testing.assert_array_equal(unpack(raw.recv(timeout=10))["actions"], policy.predict(observation()))


def test_an_oversized_message_closes_only_its_connection(server, policy):
    big = {**observation(), "padding": np.zeros(128 * 1024, np.uint8)}
    with PolicyClient(server.url) as client:
        with pytest.raises(ConnectionError, match="exceeds the server's limit"):
            client.predict(big)
    _healthy(server, policy)


def test_clients_that_vanish_or_speak_garbage_do_not_stop_the_server(server, policy):
    from websockets.sync.client import connect

    host, port = "127.0.0.1", server.port
    with socket.create_connection((host, port)) as raw:  # not even HTTP
        raw.sendall(b"\x16\x03\x01 garbage that is no handshake\r\n\r\n")
    with socket.create_connection((host, port)) as raw:  # half a handshake, then gone
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    vanishing = connect(server.url, compression=None, legacy=True)
    unpack(vanishing.recv(timeout=10))
    vanishing.send(pack({"method": "predict_batch", "observation": batch(4)}))
    vanishing.socket.close()  # gone mid-request, without a closing handshake
    _healthy(server, policy)
    _until_no_clients(server)
    assert server.active_connections == 0, "the vanished client's connection was cleaned up"


def test_several_clients_at_once_each_get_their_own_answers(server, policy):
    clients = 6
    barrier = threading.Barrier(clients + 1)
    answers: dict[int, list] = {}
    errors = []

    def work(k):
        try:
            with PolicyClient(server.url) as client:
                barrier.wait(timeout=30)
                answers[k] = [client.predict(observation(10 * k + i)) for i in range(4)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=30)
    assert server.active_connections == clients
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for k in range(clients):
        for i, answer in enumerate(answers[k]):
            np.testing.assert_array_equal(answer, policy.predict(observation(10 * k + i)))


def test_clients_beyond_max_connections_are_turned_away(policy):
    with PolicyServer(policy, port=0, max_connections=1) as running:
        with PolicyClient(running.url):
            with pytest.raises(ConnectionError, match="503"):
                PolicyClient(running.url)
        _until_no_clients(running)  # the one who left frees its place
        _healthy(running, policy)


def test_connecting_to_nothing_is_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match="cannot connect to a policy server"):
        PolicyClient(f"ws://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ValueError, match="websocket URL"):
        PolicyClient("http://127.0.0.1:1")


# -- evaluation through the server ----------------------------------------------------------------------
def _recording(monkeypatch, cls, log):
    act = cls.act

    def recorded(self, observations, tasks):
        chunks = act(self, observations, tasks)
        log.append(np.stack(chunks))
        return chunks

    monkeypatch.setattr(cls, "act", recorded)


@pytest.mark.parametrize("deterministic", [True, False])
def test_eval_server_matches_in_process_evaluation(tmp_path, tiny_policy_dir, deterministic, monkeypatch):
    tasks = ["reach-v3", "drawer-close-v3"]
    config = EvalConfig(tasks=tasks, episodes_per_task=2, num_workers=0, max_episode_steps=30, seed=3,
                        deterministic=deterministic)
    local_chunks, remote_chunks = [], []
    _recording(monkeypatch, CheckpointAgent, local_chunks)
    _recording(monkeypatch, RemotePolicyAgent, remote_chunks)
    local = evaluate(CheckpointAgent(str(tiny_policy_dir), deterministic=deterministic, seed=3), config, progress=False)
    with PolicyServer(load_policy(tiny_policy_dir, seed=3), port=0) as running:
        output = tmp_path / "remote.json"
        code = main(["eval", "--server", running.url, "--tasks", ",".join(tasks), "--episodes", "2", "--workers", "0",
                     "--quiet", "--output", str(output), "max_episode_steps=30", "seed=3",
                     f"deterministic={str(deterministic).lower()}"])
        assert code == 0
    remote = json.loads(output.read_text())
    assert remote["agent"].startswith(f"server:{running.url}")
    assert remote["episodes"] == local["episodes"] and remote["per_task"] == local["per_task"]
    assert remote["env_steps"] == local["env_steps"] and remote["protocol"]["deterministic"] is deterministic
    assert remote["protocol"]["image_size"] == 32 and remote["protocol"]["chunk_len"] == local["protocol"]["chunk_len"]
    # every decision: the same chunks, bit for bit (sampled ones too: the server's stream is seeded alike)
    assert len(remote_chunks) == len(local_chunks) > 2
    for mine, theirs in zip(local_chunks, remote_chunks):
        np.testing.assert_array_equal(theirs, mine)


def test_remote_agent_reads_the_policy_setup_from_the_server(server, policy):
    agent = RemotePolicyAgent(server.url)
    try:
        assert agent.chunk_len == policy.chunk_len and agent.observation_config() == policy.observation_config()
        chunks = agent.act([observation(0), observation(1)], ["reach-v3", "reach-v3"])
        np.testing.assert_array_equal(np.stack(chunks), policy.predict_batch(batch(2)))
    finally:
        agent.close()


def test_eval_server_that_is_not_there_exits_2(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["eval", "--server", f"ws://127.0.0.1:{port}", "--tasks", "reach-v3", "--quiet"]) == 2
    assert "cannot connect to a policy server" in capsys.readouterr().err


# -- the command -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_vlapt_serve_answers_and_stops_cleanly_on_a_signal(tiny_policy_dir, policy, stop):
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-m", "vlapt.cli.main", "serve", str(tiny_policy_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               # a shell's background job starts with SIGINT ignored, and so would the server:
                               # give it the default disposition that a terminal's Ctrl-C meets
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = process.stdout.readline()
        found = re.search(r"at (ws://127\.0\.0\.1:\d+)", line)
        assert found, (line, process.stderr.read() if process.poll() is not None else "")
        client = PolicyClient(found.group(1))
        np.testing.assert_array_equal(client.predict(observation()), policy.predict(observation()))
        process.send_signal(stop)
        try:  # communicate drains both pipes, so a chatty server cannot block on a full pipe while it stops
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"vlapt serve did not stop within 60 s of signal {stop}; its stderr:\n{err}")
        assert process.returncode == 0, err
        with pytest.raises(ConnectionError):
            client.predict(observation())
        assert "stopped" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_vlapt_serve_bad_input_exits_2(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "port must be in [0, 65535]" in err
