"""Key material at rest is wrapped by a server secret kept outside the database;
failed authentication from one address is slowed down, across server processes."""

import os
import sqlite3
import stat
from contextlib import closing

import pytest

from sk import PROTOCOL_VERSION, crypto, wire
from sk.client import Client
from sk.errors import AuthError, Unreachable
from sk_server import create_app, devices
from sk_server.secret import SecretError, load_secret
from sk_server.store import StoreError, open_store, sqlite_store

from conftest import BACKENDS, ServerProcess, new_server_db, query, sk

VERSION = str(PROTOCOL_VERSION)   # the protocol header every request carries


def test_secret_is_created_beside_a_new_database_with_mode_600(tmp_path):
    store = sqlite_store(tmp_path / "s.db")
    path = tmp_path / "s.secret"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path / "s.db", create=False) == store._secret
    assert len(store._secret) == 32


def test_key_material_is_wrapped_not_the_plain_master(server_db):
    store = open_store(server_db)
    key = devices.register(store, "a")
    key_id, _ = crypto.parse_api_key(key)
    stored = bytes(query(server_db, "SELECT master FROM keys WHERE key_id = ?", (key_id,))[0][0])
    master = crypto.derive_master(key)
    assert master not in stored and len(stored) == 1 + 12 + 32 + 16
    assert store.get_key(key_id).master == master


def test_the_server_keeps_only_the_public_half_of_an_identity(server_db):
    """A device's identity private key (what the team key is sealed to) and its API
    key's secret are nowhere on the server: not in any table, not in the SQLite
    file, not even unwrapped with the server secret; only the public half is kept."""
    store = open_store(server_db)
    key = devices.register(store, "a")
    key_id, secret = crypto.parse_api_key(key)
    private = crypto.identity_secret(key)
    public = crypto.identity_public(private)
    assert [bytes(r[0]) for r in query(server_db, "SELECT identity FROM devices")] == [public]
    assert store.keys("default", "a")["identity"] == public
    master = store.get_key(key_id).master   # all that the secret unwraps
    assert master == crypto.derive_master(key) and master != private
    store.close()
    tables = [r[0] for r in query(server_db, "SELECT table_name FROM information_schema.tables"
                                             " WHERE table_schema = current_schema()"
                                  if str(server_db).startswith("postgresql://") else
                                  "SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert {"devices", "keys", "grants"} <= set(tables)
    cells = [c for t in tables for r in query(server_db, f"SELECT * FROM {t}") for c in r]
    blobs = [bytes(c) for c in cells if isinstance(c, (bytes, memoryview))]
    texts = [c for c in cells if isinstance(c, str)]
    assert any(public in b for b in blobs)   # the search finds what is there
    for sought in (private, master, secret):
        assert not any(sought in b for b in blobs)
        assert not any(sought.hex() in t for t in texts)
    assert not any(key.split(".")[2] in t for t in texts)
    if not str(server_db).startswith("postgresql://"):
        with open(server_db, "rb") as f:
            data = f.read()
        assert public in data
        for sought in (private, master, secret, key.split(".")[2].encode()):
            assert sought not in data


def test_a_copied_database_alone_cannot_impersonate(tmp_path):
    """The thief has server.db but not server.secret: no device's key unwraps."""
    store = sqlite_store(tmp_path / "s.db")
    key = devices.register(store, "a")
    key_id, _ = crypto.parse_api_key(key)
    (tmp_path / "stolen").mkdir()
    store.backup(tmp_path / "stolen" / "s.db")   # a complete copy of the database file
    with pytest.raises(StoreError, match="no server secret"):
        sqlite_store(tmp_path / "stolen" / "s.db")
    # with a secret of their own making, nothing unwraps either
    fake = tmp_path / "stolen" / "s.secret"
    fd = os.open(fake, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"A" * 43)
    os.close(fd)
    with pytest.raises(StoreError, match="not the one this database's key material"):
        sqlite_store(tmp_path / "stolen" / "s.db").get_key(key_id)
    # nor on a database of sk 0.2.0, which has no fingerprint of its secret
    with closing(sqlite3.connect(tmp_path / "stolen" / "s.db")) as db, db:
        db.execute("DELETE FROM meta WHERE key = 'secret_check'")
    with pytest.raises(StoreError, match="does not unwrap"):
        sqlite_store(tmp_path / "stolen" / "s.db")


def test_unwrap_is_bound_to_key_id_and_detects_tampering():
    secret, master = os.urandom(32), os.urandom(32)
    wrapped = crypto.wrap_key(secret, "00112233aabbccdd", master)
    assert crypto.unwrap_key(secret, "00112233aabbccdd", wrapped) == master
    with pytest.raises(crypto.CryptoError):
        crypto.unwrap_key(secret, "ffffffffffffffff", wrapped)
    with pytest.raises(crypto.CryptoError):
        crypto.unwrap_key(os.urandom(32), "00112233aabbccdd", wrapped)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x01
        with pytest.raises(crypto.CryptoError):
            crypto.unwrap_key(secret, "00112233aabbccdd", bytes(bad))


def test_secret_from_environment_and_file_override(tmp_path, monkeypatch):
    value = "B" * 43
    monkeypatch.setenv("SK_SERVER_SECRET", value)
    store = sqlite_store(tmp_path / "env.db")
    assert store._secret == crypto.base64.urlsafe_b64decode(value + "=")
    assert not (tmp_path / "env.secret").exists()
    monkeypatch.setenv("SK_SERVER_SECRET", "short")
    with pytest.raises(SecretError, match="32 bytes"):
        load_secret(tmp_path / "env.db")
    monkeypatch.delenv("SK_SERVER_SECRET")
    shared = tmp_path / "shared.secret"
    monkeypatch.setenv("SK_SERVER_SECRET_FILE", str(shared))
    one = sqlite_store(tmp_path / "one.db")
    assert shared.exists() and load_secret(tmp_path / "other.db") == one._secret


def test_postgresql_needs_the_shared_secret_outside_the_database(tmp_path, monkeypatch,
                                                                request):
    if "postgresql" not in BACKENDS:
        pytest.skip("PostgreSQL not among SK_TEST_BACKENDS")
    db, env = new_server_db(request, "postgresql", tmp_path)
    with pytest.raises(StoreError, match="SK_SERVER_SECRET"):   # nowhere to keep one
        open_store(db)
    monkeypatch.setenv("SK_SERVER_SECRET_FILE", env["SK_SERVER_SECRET_FILE"])
    with closing(open_store(db)) as first:
        key_id, _ = crypto.parse_api_key(devices.register(first, "a"))
    assert stat.S_IMODE(os.stat(env["SK_SERVER_SECRET_FILE"]).st_mode) == 0o600
    with closing(open_store(db)) as second:                      # a second server
        assert second.get_key(key_id).device == "a"
    # a server given another secret cannot use the key material
    monkeypatch.delenv("SK_SERVER_SECRET_FILE")
    monkeypatch.setenv("SK_SERVER_SECRET", "C" * 43)
    with pytest.raises(StoreError, match="not the one this database's key material is wrapped"):
        open_store(db)
    # nor does a server start without one once the database holds keys
    monkeypatch.delenv("SK_SERVER_SECRET")
    monkeypatch.setenv("SK_SERVER_SECRET_FILE", str(tmp_path / "missing.secret"))
    with pytest.raises(StoreError, match="no server secret"):
        open_store(db)


def test_servers_with_different_secrets_on_one_database_are_refused(server_db, tmp_path,
                                                                    monkeypatch):
    """Two hosts that each made their own secret for an empty database: the second
    is refused at start, before any device is registered, not with 500s later."""
    with closing(open_store(server_db)):
        pass
    monkeypatch.setenv("SK_SERVER_SECRET", "D" * 43)
    with pytest.raises(StoreError, match="every server on a database needs the same"):
        open_store(server_db)


def test_group_readable_secret_is_refused(tmp_path):
    sqlite_store(tmp_path / "s.db")
    os.chmod(tmp_path / "s.secret", 0o644)
    with pytest.raises(StoreError, match="readable by others"):
        open_store(tmp_path / "s.db")


def test_failed_authentication_is_slowed_down_per_address(server_db):
    app = create_app({"DB": server_db, "AUTH_FAIL_LIMIT": 5})
    store = app.extensions["sk_store"]
    good = devices.register(store, "good")
    client = app.test_client()
    key_id, _ = crypto.parse_api_key(good)
    wrong = crypto.derive_master(crypto.new_api_key()[1])

    def attempt(master, addr="10.0.0.1"):
        blob, _ = wire.seal_request(master, key_id, "hello", {})
        return client.post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": addr},
                           headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id})

    codes = [attempt(wrong).status_code for _ in range(7)]
    assert codes == [401] * 5 + [429] * 2
    blob, nonce = wire.seal_request(wrong, key_id, "hello", {})
    r = client.post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": "10.0.0.1"},
                    headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id})
    assert r.status_code == 429 and r.headers["Retry-After"] == "60"
    # sealed for the key the server holds under that key id, as every answer past the key lookup
    answer = wire.open_response(crypto.derive_master(good), key_id, "hello", nonce, r.data)
    assert answer["error"]["code"] == "slow_down"
    # a request that authenticates is never refused for others' failures (one NAT)
    assert attempt(crypto.derive_master(good)).status_code == 200
    assert attempt(crypto.derive_master(good), "10.0.0.2").status_code == 200
    # unknown key ids count too, and so do replays
    blob, _ = wire.seal_request(crypto.derive_master(good), key_id, "hello", {})
    first = client.post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": "10.0.0.3"},
                        headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id})
    again = [client.post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": "10.0.0.3"},
                         headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id}).status_code
             for _ in range(6)]
    assert first.status_code == 200 and again == [400] * 5 + [429]
    # the count lives in the store: a second app on the same database sees it
    other = create_app({"DB": server_db, "AUTH_FAIL_LIMIT": 5})
    blob, _ = wire.seal_request(wrong, key_id, "hello", {})
    r = other.test_client().post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": "10.0.0.1"},
                                 headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id})
    assert r.status_code == 429


@pytest.mark.slow
def test_real_server_wrong_key_then_slow_down_exit_codes(tmp_path, server_db):
    srv = ServerProcess(server_db).start()
    try:
        good = srv.register("a")
        key_id, _ = crypto.parse_api_key(good)
        forged = f"sk1.{key_id}." + "A" * 43
        for _ in range(20):
            with pytest.raises(AuthError, match="wrong or mistyped"):
                Client(srv.url, forged).hello()
        with pytest.raises(Unreachable, match="429"):
            Client(srv.url, forged).hello()
        assert Client(srv.url, good).hello()["device"] == "a"   # the honest device goes on
        assert stat.S_IMODE((tmp_path / "server.secret").stat().st_mode) == 0o600
        p = sk("sk-admin", "--db", server_db, "stats", check=0)
        assert "devices: 1" in p.stdout
    finally:
        srv.stop()


def test_behind_a_proxy_the_slow_down_is_per_forwarded_client(server_db):
    """Behind a proxy every request comes from the proxy's address: with
    FORWARDED_FOR the count is kept per client (X-Forwarded-For), so one client's
    wrong key does not lock out every device."""
    app = create_app({"DB": server_db, "AUTH_FAIL_LIMIT": 5, "FORWARDED_FOR": 1})
    store = app.extensions["sk_store"]
    good = devices.register(store, "good")
    key_id, _ = crypto.parse_api_key(good)
    wrong = crypto.derive_master(crypto.new_api_key()[1])
    client = app.test_client()

    def attempt(master, client_addr):
        blob, _ = wire.seal_request(master, key_id, "hello", {})
        return client.post("/api/hello", data=blob, environ_base={"REMOTE_ADDR": "10.9.9.9"},
                           headers={wire.PROTOCOL_HEADER: VERSION, wire.KEY_HEADER: key_id,
                                    "X-Forwarded-For": client_addr})

    assert [attempt(wrong, "192.0.2.1").status_code for _ in range(6)] == [401] * 5 + [429]
    assert attempt(wrong, "192.0.2.2").status_code == 401
    assert attempt(crypto.derive_master(good), "192.0.2.1").status_code == 200
    store.close()
