"""A real S3 server for the tests: Ceph RGW on loopback, as plain child processes.

    ceph-mon (1) ─ ceph-osd (1, memstore: data in RAM) ─ radosgw (beast, 127.0.0.1:PORT)

Everything lives under one work directory: `ceph.conf` (passed with `-c`), one keyring with
the keys of every daemon, the mon's store. Nothing in /etc/ceph or /var/lib/ceph, no systemd,
no ceph-mgr (RGW does not need one). The settings that make it start in seconds rather than
twenty are in `_conf` (measured in shared/object-storage.md).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from mirror.config import S3Config
from tests.s3client import S3
from tests.services import Service, ServiceError, free_port, http_status

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-authtool", "monmaptool", "ceph")
FSID = "6f1c4d2e-9d1b-4a37-9b3c-6a2f0f5e7a11"
START_TIMEOUT = 60.0
# The RAM an OSD may use for objects (a cap, taken as filled): the bench keeps ten 512 MiB
# blobs in it.
MEMSTORE_BYTES = 8 * 1024**3


def ceph_available() -> bool:
    return all(shutil.which(b) for b in CEPH_BINARIES)


def _run(cmd: list[str], timeout: float = 60.0) -> str:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(cmd[:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


class _CephDaemon(Service):
    """One ceph daemon in the foreground (`-f`), logging to its own file."""

    ready_timeout = START_TIMEOUT

    def __init__(self, workdir: Path, conf: Path, args: list[str], name: str) -> None:
        super().__init__(workdir)
        self.name = name
        self.conf = conf
        self.args = args
        self.ready = lambda: True

    def command(self) -> list[str]:
        return [*self.args, "-f", "-c", str(self.conf)]

    def is_ready(self) -> bool:
        return self.ready()


class CephRGW:
    """A one-node Ceph cluster with an S3 gateway and one S3 user, on loopback ports."""

    region = "us-east-1"

    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf = self.workdir / "ceph.conf"
        self.keyring = self.workdir / "keyring"
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.access_key = "MIRRORTESTACCESSKEY1"
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self._mon: _CephDaemon | None = None
        self._osd: _CephDaemon | None = None
        self._rgw: _CephDaemon | None = None
        self._buckets = itertools.count(1)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> Self:
        try:
            self._write_conf()
            self._make_keyring()
            self._start_mon()
            self._start_osd()
            self.start_gateway()
            self._create_user()
            self._warm_up()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for daemon in (self._rgw, self._osd, self._mon):
            if daemon is not None:
                daemon.stop()
        self._rgw = self._osd = self._mon = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def gateway_pid(self) -> int:
        assert self._rgw is not None
        return self._rgw.pid

    def pids(self) -> dict[str, int]:
        """The running daemons' pids, by name (for CPU figures)."""
        daemons = {"radosgw": self._rgw, "ceph-osd": self._osd, "ceph-mon": self._mon}
        return {name: d.pid for name, d in daemons.items() if d is not None and d.proc}

    def stop_gateway(self) -> None:
        """Stop radosgw only: S3 is then unreachable, the stored objects are kept."""
        if self._rgw is not None:
            self._rgw.stop()
            self._rgw = None

    def start_gateway(self) -> None:
        """(Re)start radosgw on the same port."""
        rgw = _CephDaemon(
            self.workdir / "rgw", self.conf, ["radosgw", "-n", "client.rgw.test"], "radosgw"
        )
        rgw.ready = lambda: http_status(self.endpoint + "/") is not None
        self._rgw = rgw.start()

    # --- S3 helpers for tests --------------------------------------------------------------
    def s3(self) -> S3:
        """A plain synchronous S3 client for this server, for tests to look into buckets."""
        return S3(self.endpoint, self.access_key, self.secret_key, self.region)

    def requests(self) -> int:
        """S3 requests radosgw has served so far (its own `req` counter)."""
        sock = self.workdir / "run" / "client.rgw.test.asok"
        dump = json.loads(_run(["ceph", "--admin-daemon", str(sock), "perf", "dump"]))
        return int(dump["rgw"]["req"])

    def presign(self, bucket: str, key: str, expires: int = 3600) -> str:
        """A presigned GET URL for one object, as a client outside the mirror would use."""
        url: str = self.s3().client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )
        return url

    def new_bucket_name(self) -> str:
        return f"mirror-test-{next(self._buckets)}-{uuid.uuid4().hex[:8]}"

    def admin(self, *args: str) -> str:
        """Run `radosgw-admin` against this cluster."""
        return _run(["radosgw-admin", "-c", str(self.conf), "-n", "client.admin", *args])

    # --- setup steps ---------------------------------------------------------------------
    def _write_conf(self) -> None:
        self.conf.write_text(_conf(self))

    def _make_keyring(self) -> None:
        keyring = str(self.keyring)
        _run(["ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.",
              "--cap", "mon", "allow *"])  # fmt: skip
        _run(["ceph-authtool", keyring, "--gen-key", "-n", "client.admin",
              "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *",
              "--cap", "mgr", "allow *"])  # fmt: skip
        _run(["ceph-authtool", keyring, "--gen-key", "-n", "osd.0",
              "--cap", "mon", "allow profile osd", "--cap", "osd", "allow *"])  # fmt: skip
        _run(["ceph-authtool", keyring, "--gen-key", "-n", "client.rgw.test",
              "--cap", "mon", "allow rw", "--cap", "osd", "allow rwx"])  # fmt: skip

    def _start_mon(self) -> None:
        monmap = self.workdir / "monmap"
        _run(["monmaptool", "--create", "--fsid", FSID,
              "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", str(monmap)])  # fmt: skip
        mon_data = self.workdir / "mon"
        _run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
              "--keyring", str(self.keyring), "--mon-data", str(mon_data)])  # fmt: skip
        mon = _CephDaemon(self.workdir / "mon-log", self.conf, ["ceph-mon", "-i", "a"], "ceph-mon")
        mon.ready = self._mon_answers
        self._mon = mon.start()

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        self.ceph("osd", "new", osd_uuid, "0")
        osd_data = self.workdir / "osd"
        osd_data.mkdir(exist_ok=True)
        _run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
              "--osd-data", str(osd_data), "--keyring", str(self.keyring)])  # fmt: skip
        osd = _CephDaemon(self.workdir / "osd-log", self.conf, ["ceph-osd", "-i", "0"], "ceph-osd")
        osd.ready = self._osd_up
        self._osd = osd.start()

    def _create_user(self) -> None:
        self.admin("user", "create", "--uid", "mirror", "--display-name", "mirror tests",
                   "--access-key", self.access_key, "--secret-key", self.secret_key)  # fmt: skip

    def _warm_up(self) -> None:
        # RGW creates its data pools on the first write: pay for that here, not in a test.
        s3 = self.s3()
        bucket = self.new_bucket_name()
        s3.create_bucket(bucket)
        s3.put(bucket, "warm-up", b"x")
        assert s3.get(bucket, "warm-up") == b"x"
        s3.delete(bucket, "warm-up")
        s3.delete_bucket(bucket)

    # --- probes ----------------------------------------------------------------------------
    def ceph(self, *args: str, timeout: float = 30.0) -> str:
        return _run(["ceph", "-c", str(self.conf), "-n", "client.admin", *args], timeout)

    def _mon_answers(self) -> bool:
        try:
            self.ceph("mon", "stat", "--connect-timeout", "2", timeout=5)
        except (ServiceError, subprocess.TimeoutExpired):
            return False
        return True

    def _osd_up(self) -> bool:
        try:
            dump = json.loads(self.ceph("osd", "dump", "--format", "json", timeout=5))
        except (ServiceError, subprocess.TimeoutExpired, ValueError):
            return False
        return any(osd.get("osd") == 0 and osd.get("up") == 1 for osd in dump.get("osds", []))


def _conf(rgw: CephRGW) -> str:
    w = rgw.workdir
    return f"""[global]
fsid = {FSID}
mon_host = [v2:127.0.0.1:{rgw.mon_port}]
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {rgw.keyring}
log_file = {w}/$name.log
run_dir = {w}/run
admin_socket = {w}/run/$name.asok
pid_file = {w}/run/$name.pid
ms_bind_port_min = 40000
ms_bind_port_max = 40999
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 1
mon_data_avail_crit = 0
mon_warn_on_pool_no_redundancy = false
auth_allow_insecure_global_id_reclaim = false

[mon]
mon_data = {w}/mon
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
mon_initial_members = a

[osd]
osd_data = {w}/osd
osd_objectstore = memstore
memstore_device_bytes = {MEMSTORE_BYTES}
osd_max_object_size = 1073741824

[client.rgw.test]
rgw_frontends = beast endpoint=127.0.0.1:{rgw.rgw_port} tcp_nodelay=1
rgw_data = {w}/rgw-data
rgw_dns_name = 127.0.0.1
rgw_thread_pool_size = 64
rgw_enable_usage_log = false
"""


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephRGW]:
    """One Ceph RGW for the whole session (it takes seconds to start)."""
    if not ceph_available():
        pytest.skip("ceph-mon, ceph-osd and radosgw are not installed (make system-deps)")
    with CephRGW(tmp_path_factory.mktemp("rgw")) as server:
        yield server


@pytest.fixture
def s3_bucket(rgw: CephRGW) -> Iterator[str]:
    """A fresh, empty bucket for one test; emptied and removed afterwards."""
    s3 = rgw.s3()
    name = rgw.new_bucket_name()
    s3.create_bucket(name)
    yield name
    with contextlib.suppress(Exception):
        s3.empty_and_delete_bucket(name)


@pytest.fixture
def s3(rgw: CephRGW, s3_bucket: str) -> S3Config:
    """storage.s3 for this test's fresh bucket, under a prefix."""
    return S3Config(
        bucket=s3_bucket,
        endpoint=rgw.endpoint,
        region=rgw.region,
        prefix="cache/",
        access_key_id=rgw.access_key,
        secret_access_key=rgw.secret_key,
    )
