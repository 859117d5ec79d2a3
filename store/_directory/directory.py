"""The directory: claypot's metadata in Redis.

Keys (all under a prefix, ``claypot:`` by default):

    objects   hash  object id -> "backend_id|class_key|alias[|alias...]"
    aliases   hash  alias -> object id

An object has any number of aliases: they follow the class key, separated by
``|`` (the one character an alias may not hold), so a backend's stored
alias field carries the same joined string and ``claypot repair`` and the
republish after a restart bring every alias back.
    backends  hash  backend id -> JSON (address, host, pid, stats)
    alive:<backend id>  string with a TTL, refreshed by the backend's heartbeat
    code      hash  code key -> signed cloudpickle of a class or task function
    epoch     string set once per directory; its absence means Redis lost data
    replicas  hash  object id -> "epoch|primary|factor|replica,replica" (replicated objects;
                    see store.backend._core.replication). Changed only by a compare-and-set on
                    the epoch and primary, which also switches the objects entry's owner.

Only backends talk to Redis; clients ask a backend. The URL is ``redis://...``
or ``redis+sentinel://[:password@]host:port[,host:port]/service[/db]`` (a
primary watched by Redis Sentinels, followed through failovers). The entries a Redis writer
could abuse are signed with keys derived from the cluster token
(:class:`store._util.security.DirectoryKeys`): code entries (backends unpickle them)
and backend records (clients send their token to those addresses). A reader
verifies them first: a forged code entry is refused, a forged backend record
is left out. Updates that must be
atomic (claiming a batch of ids and aliases, moving an object) are Lua
scripts, so a failed batch leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
import functools
import logging
import time
import uuid

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from store.errors import (
    AliasExists,
    AliasNotFound,
    BackendUnavailable,
    ClassNotFound,
    ConfigurationError,
    ObjectNotFound,
)
from store._util.security import DirectoryKeys, TamperedEntry

log = logging.getLogger("claypot.directory")

# Connection errors are retried with capped backoff for about this long, which
# rides over a Redis restart; after that the operation fails with a claypot error.
_REDIS_RETRIES = 8
_REDIS_BACKOFF = ExponentialBackoff(cap=0.5, base=0.02)

_CLAIM = """
local objects, aliases = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  local oid, joined = ARGV[2 + i * 3], ARGV[4 + i * 3]
  for alias in string.gmatch(joined, '[^|]+') do
    local owner = redis.call('HGET', aliases, alias)
    if owner and owner ~= oid then return {'alias', alias} end
  end
end
for i = 0, n - 1 do
  local oid, value, joined = ARGV[2 + i * 3], ARGV[3 + i * 3], ARGV[4 + i * 3]
  redis.call('HSET', objects, oid, value)
  for alias in string.gmatch(joined, '[^|]+') do redis.call('HSET', aliases, alias, oid) end
end
return {'ok', ''}
"""

# _CLAIM, and each claimed id is also noted in a per-backend set of claims whose
# storage fsync may still be running (KEYS[3]); ids whose fsync has since finished
# (after the entries in ARGV) leave that set in the same round trip.
_CLAIM_UNSYNCED = """
local objects, aliases, unsynced = KEYS[1], KEYS[2], KEYS[3]
local n = tonumber(ARGV[1])
local settled = 2 + n * 3
for i = settled, #ARGV do redis.call('SREM', unsynced, ARGV[i]) end
for i = 0, n - 1 do
  local oid, joined = ARGV[2 + i * 3], ARGV[4 + i * 3]
  for alias in string.gmatch(joined, '[^|]+') do
    local owner = redis.call('HGET', aliases, alias)
    if owner and owner ~= oid then return {'alias', alias} end
  end
end
for i = 0, n - 1 do
  local oid, value, joined = ARGV[2 + i * 3], ARGV[3 + i * 3], ARGV[4 + i * 3]
  redis.call('SADD', unsynced, oid)
  redis.call('HSET', objects, oid, value)
  for alias in string.gmatch(joined, '[^|]+') do redis.call('HSET', aliases, alias, oid) end
end
return {'ok', ''}
"""

_SET_ALIAS = """
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner and owner ~= ARGV[2] then return 'taken' end
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return 'missing' end
local b, c, old = string.match(entry, '^([^|]*)|([^|]*)|(.*)$')
for alias in string.gmatch(old, '[^|]+') do
  if alias ~= ARGV[1] then redis.call('HDEL', KEYS[2], alias) end
end
redis.call('HSET', KEYS[1], ARGV[2], b .. '|' .. c .. '|' .. ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 'ok'
"""

# Adds one alias to an object's list; returns the joined list after the change.
_ADD_ALIAS = """
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner and owner ~= ARGV[2] then return {'taken', ''} end
local entry = redis.call('HGET', KEYS[1], ARGV[2])
if not entry then return {'missing', ''} end
local b, c, old = string.match(entry, '^([^|]*)|([^|]*)|(.*)$')
for alias in string.gmatch(old, '[^|]+') do
  if alias == ARGV[1] then return {'ok', old} end
end
local joined = ARGV[1]
if old ~= '' then joined = old .. '|' .. ARGV[1] end
redis.call('HSET', KEYS[1], ARGV[2], b .. '|' .. c .. '|' .. joined)
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {'ok', joined}
"""

# Removes one alias (the object keeps its others); returns {oid, remaining list}.
_DELETE_ALIAS = """
local oid = redis.call('HGET', KEYS[2], ARGV[1])
if not oid then return false end
redis.call('HDEL', KEYS[2], ARGV[1])
local entry = redis.call('HGET', KEYS[1], oid)
local kept = ''
if entry then
  local b, c, old = string.match(entry, '^([^|]*)|([^|]*)|(.*)$')
  for alias in string.gmatch(old, '[^|]+') do
    if alias ~= ARGV[1] then
      if kept == '' then kept = alias else kept = kept .. '|' .. alias end
    end
  end
  redis.call('HSET', KEYS[1], oid, b .. '|' .. c .. '|' .. kept)
end
return {oid, kept}
"""

_RESOLVE_ALIAS = """
local oid = redis.call('HGET', KEYS[2], ARGV[1])
if not oid then return false end
return {oid, redis.call('HGET', KEYS[1], oid) or ''}
"""

_MOVE = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
local b, rest = string.match(entry, '^([^|]*)|(.*)$')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. rest)
return 1
"""


# Replica set compare-and-set: ARGV = oid, expected epoch (0: no set yet), expected
# primary, new encoded set, new primary. Applies only if the set in Redis still has
# that epoch and the objects entry still names that primary; then both change together.
# A change of primary (a promotion) also needs the old primary's heartbeat key (KEYS[3])
# gone: a primary whose heartbeat was stored is never deposed behind its back, so one
# that renews its lease after a gap and then finds itself still the owner really is.
_REPLICA_CAS = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 'missing' end
local b, rest = string.match(entry, '^([^|]*)|(.*)$')
if b ~= ARGV[3] then return 'owner' end
local cur = redis.call('HGET', KEYS[2], ARGV[1])
local epoch = 0
if cur then epoch = tonumber(string.match(cur, '^([^|]*)|')) end
if epoch ~= tonumber(ARGV[2]) then return 'epoch' end
if ARGV[5] ~= b and redis.call('EXISTS', KEYS[3]) == 1 then return 'alive' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
if ARGV[5] ~= b then redis.call('HSET', KEYS[1], ARGV[1], ARGV[5] .. '|' .. rest) end
return 'ok'
"""

# Forget an object only if the objects entry still names ARGV[2] as its owner: a deposed
# primary's delete must not remove the entry (and replica set) of the backend that took over.
_FORGET = """
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 'missing' end
local b, c, aliases = string.match(entry, '^([^|]*)|([^|]*)|(.*)$')
if ARGV[2] ~= '' and b ~= ARGV[2] then return 'owner' end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
for alias in string.gmatch(aliases, '[^|]+') do redis.call('HDEL', KEYS[2], alias) end
return 'ok'
"""

SENTINEL_SCHEME = "redis+sentinel://"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """``redis+sentinel://host:port[,host:port...]/service[/db]`` as (sentinels, service, db)."""
    rest = url[len(SENTINEL_SCHEME) :]
    hosts, _, path = rest.partition("/")
    hosts = hosts.rpartition("@")[2]  # the password is the primary's (sentinel_auth)
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ConfigurationError(f"a Sentinel URL is redis+sentinel://host:port[,host:port]/service[/db], not {url!r}")
    sentinels = []
    for item in hosts.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(f"sentinel address {item!r} in {url!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    if len(parts) == 2 and not parts[1].isdigit():
        raise ConfigurationError(f"the database in {url!r} is not a number")
    return sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0


def sentinel_auth(url: str) -> dict:
    """Username and password of the primary, from a Sentinel URL's ``user:password@``."""
    from urllib.parse import unquote

    netloc = url[len(SENTINEL_SCHEME) :].partition("/")[0]
    if "@" not in netloc:
        return {}
    user, _, password = netloc.rpartition("@")[0].partition(":")
    out = {"password": unquote(password)} if password else {}
    if user:
        out["username"] = unquote(user)
    return out


def _connect(url: str, timeout: float) -> tuple:
    """(sentinel, service, client) for a directory URL: plain Redis, or the primary a
    set of Sentinels names (redis-py re-asks them after a connection error, so a
    failover is followed by the retries)."""
    options = dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=Retry(_REDIS_BACKOFF, _REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    if not url.startswith(SENTINEL_SCHEME):
        return None, "", redis.Redis.from_url(url, **options)
    from redis.sentinel import Sentinel

    sentinels, service, db = parse_sentinel_url(url)
    options.update(sentinel_auth(url))
    # Sentinel questions are short and never retried on one sentinel (redis-py
    # would back off for seconds): a dead sentinel must not stall a failover,
    # the next one is asked instead.
    quick = min(timeout, 1.0)
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={"socket_timeout": quick, "socket_connect_timeout": quick, "retry": Retry(NoBackoff(), 0)},
    )
    # redis-py nests the connection's retries inside the command's: fewer of each,
    # and a short connect timeout, so a dead primary is given up in seconds and
    # the Sentinels asked again (they name the promoted replica after a failover).
    options.update(socket_connect_timeout=quick, retry=Retry(_REDIS_BACKOFF, 3))
    return sentinel, service, sentinel.master_for(service, db=db, **options)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    if url.startswith(SENTINEL_SCHEME):  # several host:port: urlsplit cannot take them
        netloc, slash, path = url[len(SENTINEL_SCHEME) :].partition("/")
        if "@" in netloc:
            user = netloc.rpartition("@")[0].partition(":")[0]
            netloc = f"{user}:***@" + netloc.rpartition("@")[2]
        return SENTINEL_SCHEME + netloc + slash + path
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<redis url>"


class ObjectEntry(tuple):
    """(backend_id, class_key, alias) of one object."""

    __slots__ = ()

    backend_id = property(lambda self: self[0])
    class_key = property(lambda self: self[1])
    alias = property(lambda self: self[2])  # every alias, joined with "|"

    @property
    def aliases(self) -> list[str]:
        """The object's aliases, oldest first."""
        return split_aliases(self[2])


def split_aliases(joined: str) -> list[str]:
    """The aliases of a joined alias field ("a|b" -> ["a", "b"], "" -> [])."""
    return [a for a in joined.split("|") if a]


def _entry(raw: bytes | str) -> ObjectEntry:
    text = raw.decode() if isinstance(raw, bytes) else raw
    backend, key, alias = text.split("|", 2)
    return ObjectEntry((backend, key, alias))


def _claim_argv(entries: list[tuple[str, str, str, str]]) -> list[str]:
    """The ARGV of the claim scripts: a count, then (id, entry, aliases) per entry."""
    argv: list[str] = [str(len(entries))]
    for oid, backend, key, alias in entries:
        argv += [oid, f"{backend}|{key}|{alias or ''}", alias or ""]
    return argv


def _pool_connection(pool):
    """A connection from ``pool`` (redis-py 5 wants a command name, later ones none)."""
    try:
        return pool.get_connection()
    except TypeError:
        return pool.get_connection("EVALSHA")


def _unreachable_as_claypot_error(cls):
    """Wrap every public method so a Redis that stays unreachable raises BackendUnavailable.

    Callers (the servicer) send errors back to clients, who must only ever
    see claypot errors, never a redis-py exception.
    """

    def wrap(fn):
        @functools.wraps(fn)
        def method(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise BackendUnavailable(f"the directory (Redis at {self.url}) is unreachable: {exc}") from None

        return method

    for name, value in list(vars(cls).items()):
        if callable(value) and not name.startswith("_") and name not in ("close", "wait_ready"):
            setattr(cls, name, wrap(value))
    return cls


@_unreachable_as_claypot_error
class Directory:
    """Typed access to the directory keys in Redis.

    A lost connection is retried with capped backoff (a Redis restart is
    ridden over); a Redis that stays down raises BackendUnavailable.
    """

    def __init__(self, url: str, prefix: str = "claypot:", timeout: float = 5.0, token: str = ""):
        if not url:
            raise ConfigurationError("the directory needs a Redis URL")
        # Shown in error messages, which reach clients and logs: never the password.
        self.url = redact_url(url)
        self.keys = DirectoryKeys.from_token(token)
        self.prefix = prefix
        self.sentinel, self.service, self.r = _connect(url, timeout)
        self.k_objects = prefix + "objects"
        self.k_aliases = prefix + "aliases"
        self.k_backends = prefix + "backends"
        self.k_code = prefix + "code"
        self.k_epoch = prefix + "epoch"
        self.k_replicas = prefix + "replicas"
        self._claim = self.r.register_script(_CLAIM)
        self._claim_unsynced = self.r.register_script(_CLAIM_UNSYNCED)
        self._set_alias = self.r.register_script(_SET_ALIAS)
        self._delete_alias = self.r.register_script(_DELETE_ALIAS)
        self._add_alias = self.r.register_script(_ADD_ALIAS)
        self._move = self.r.register_script(_MOVE)
        self._resolve_alias = self.r.register_script(_RESOLVE_ALIAS)
        self._replica_cas = self.r.register_script(_REPLICA_CAS)
        self._forget_owned = self.r.register_script(_FORGET)

    def close(self) -> None:
        self.r.close()

    def primary(self) -> str | None:
        """Address of the Redis primary now serving (Sentinel URLs), else None.

        A change means a failover: the promoted replica may lack the last writes
        (replication is asynchronous), so backends republish what they hold.
        """
        if self.sentinel is None:
            return None
        try:
            host, port = self.sentinel.discover_master(self.service)
        except redis.RedisError:
            return None
        return f"{host}:{port}"

    # -- epoch: detects a wiped or data-losing Redis ----------------------------
    def epoch(self) -> str | None:
        raw = self.r.get(self.k_epoch)
        return raw.decode() if raw else None

    def ensure_epoch(self) -> str:
        self.r.set(self.k_epoch, uuid.uuid4().hex, nx=True)
        return self.epoch() or ""

    # -- objects -------------------------------------------------------------------
    def claim(self, entries: list[tuple[str, str, str, str]]) -> None:
        """Register (object_id, backend_id, class_key, alias) entries, all or none.

        Raises AliasExists if an alias belongs to another object.
        """
        if not entries:
            return
        argv: list[str] = [str(len(entries))]
        for oid, backend, key, alias in entries:
            argv += [oid, f"{backend}|{key}|{alias or ''}", alias or ""]
        status, alias = self._claim(keys=[self.k_objects, self.k_aliases], args=argv)
        if status == b"alias":
            raise AliasExists(f"alias {alias.decode()!r} is already taken")

    def claim_unsynced(self, entries: list[tuple[str, str, str, str]], owner: str, settled: list[str] = ()) -> None:
        """:meth:`claim` made while ``owner`` is still fsync'ing the entries' storage.

        The ids are noted in ``owner``'s set of unsynced claims until a later
        call names them in ``settled`` (their fsync finished). If the owner
        crashes in between, its restart finds in that set the entries whose
        storage did not survive and forgets them (see :meth:`unsynced`).
        Raises AliasExists if an alias belongs to another object.
        """
        if not entries:
            if settled:
                self.r.srem(self._k_unsynced(owner), *settled)
            return
        argv = _claim_argv(entries) + list(settled)
        status, alias = self._claim_unsynced(keys=[self.k_objects, self.k_aliases, self._k_unsynced(owner)], args=argv)
        if status == b"alias":
            raise AliasExists(f"alias {alias.decode()!r} is already taken")

    def claim_unsynced_send(
        self, entries: list[tuple[str, str, str, str]], owner: str, settled: list[str] = ()
    ) -> Callable[[], Any]:
        """Send :meth:`claim_unsynced` without waiting for Redis; returns ``finish()``.

        The caller does other work (the fsync of the entries' storage) while
        Redis runs the claim, then calls ``finish()``, which reads the reply
        and raises what :meth:`claim_unsynced` would. If the connection fails
        the claim is sent again the ordinary way (with retries): running the
        script twice is harmless, its writes are the same both times.
        """
        argv = _claim_argv(entries) + list(settled)
        keys = [self.k_objects, self.k_aliases, self._k_unsynced(owner)]
        pool = self.r.connection_pool
        conn = None
        try:
            conn = _pool_connection(pool)
            conn.send_command("EVALSHA", self._claim_unsynced.sha, len(keys), *keys, *argv)
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            if conn is not None:
                conn.disconnect()
                pool.release(conn)
            conn = None

        def finish() -> None:
            reply = None
            if conn is not None:
                try:
                    reply = conn.read_response()
                except redis.exceptions.NoScriptError:
                    reply = None  # Redis restarted and lost its script cache
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    conn.disconnect()
                    reply = None
                finally:
                    pool.release(conn)
            try:
                if reply is None:
                    reply = self._claim_unsynced(keys=keys, args=argv)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise BackendUnavailable(f"the directory (Redis at {self.url}) is unreachable: {exc}") from None
            status, alias = reply
            if status == b"alias":
                raise AliasExists(f"alias {alias.decode()!r} is already taken")

        return finish

    def unsynced(self, owner: str) -> list[str]:
        """Ids ``owner`` claimed while their storage fsync may not have finished."""
        return [m.decode() for m in self.r.smembers(self._k_unsynced(owner))]

    def clear_unsynced(self, owner: str, object_ids: list[str]) -> None:
        """Take ``object_ids`` out of ``owner``'s set of unsynced claims."""
        if object_ids:
            self.r.srem(self._k_unsynced(owner), *object_ids)

    def _k_unsynced(self, owner: str) -> str:
        return f"{self.prefix}unsynced:{owner}"

    def lookup(self, object_id: str) -> ObjectEntry:
        raw = self.r.hget(self.k_objects, object_id)
        if raw is None:
            raise ObjectNotFound(f"no object with id {object_id}")
        return _entry(raw)

    def lookup_many(self, object_ids: list[str]) -> list[ObjectEntry | None]:
        """The entry of each id (None where the directory has none), in one round trip."""
        if not object_ids:
            return []
        return [None if raw is None else _entry(raw) for raw in self.r.hmget(self.k_objects, object_ids)]

    def resolve_alias(self, alias: str) -> str:
        raw = self.r.hget(self.k_aliases, alias)
        if raw is None:
            raise AliasNotFound(f"no object with alias {alias!r}")
        return raw.decode()

    def lookup_alias(self, alias: str) -> tuple[str, ObjectEntry]:
        """(object id, entry) for an alias, in one round trip."""
        found = self._resolve_alias(keys=[self.k_objects, self.k_aliases], args=[alias])
        if not found:
            raise AliasNotFound(f"no object with alias {alias!r}")
        oid, raw = found[0].decode(), found[1]
        if not raw:
            raise ObjectNotFound(f"alias {alias!r} names object {oid}, which no longer exists")
        return oid, _entry(raw)

    def forget(self, object_id: str, owner: str = "") -> bool:
        """Remove an object and its aliases; with ``owner``, only while the entry names
        that backend (atomically). True if removed (or already gone, without ``owner``)."""
        if owner:
            status = self._forget_owned(keys=[self.k_objects, self.k_aliases, self.k_replicas], args=[object_id, owner])
            return status == b"ok"
        raw = self.r.hget(self.k_objects, object_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.k_objects, object_id)
        pipe.hdel(self.k_replicas, object_id)
        if raw is not None:
            aliases = _entry(raw).aliases
            if aliases:
                pipe.hdel(self.k_aliases, *aliases)
        pipe.execute()
        return True

    def set_alias(self, alias: str, object_id: str) -> None:
        status = self._set_alias(keys=[self.k_objects, self.k_aliases], args=[alias, object_id])
        if status == b"taken":
            raise AliasExists(f"alias {alias!r} is already taken")
        if status == b"missing":
            raise ObjectNotFound(f"no object with id {object_id}")

    def delete_alias(self, alias: str) -> str:
        """Remove one alias; returns the id of the object it named (which keeps the others)."""
        return self.remove_alias(alias)[0]

    def remove_alias(self, alias: str) -> tuple[str, str]:
        """Remove one alias, atomically; (object id, its remaining aliases joined)."""
        found = self._delete_alias(keys=[self.k_objects, self.k_aliases], args=[alias])
        if not found:
            raise AliasNotFound(f"no object with alias {alias!r}")
        return found[0].decode(), found[1].decode()

    def add_alias(self, alias: str, object_id: str) -> str:
        """Give an object one more alias, atomically; returns all its aliases joined.

        Adding an alias the object already has changes nothing. Raises
        AliasExists if another object has it, ObjectNotFound if the object is gone.
        """
        status, joined = self._add_alias(keys=[self.k_objects, self.k_aliases], args=[alias, object_id])
        if status == b"taken":
            raise AliasExists(f"alias {alias!r} is already taken")
        if status == b"missing":
            raise ObjectNotFound(f"no object with id {object_id}")
        return joined.decode()

    def move(self, object_id: str, backend_id: str) -> None:
        if not self._move(keys=[self.k_objects], args=[object_id, backend_id]):
            raise ObjectNotFound(f"no object with id {object_id}")

    # -- replicas ----------------------------------------------------------------
    def replica_set(self, object_id: str) -> Any:
        """The object's ReplicaSet (store.backend._core.replication), or None if it has none."""
        from store._directory.replica_set import ReplicaSet

        raw = self.r.hget(self.k_replicas, object_id)
        return None if raw is None else ReplicaSet.decode(raw.decode())

    def replica_sets(self, object_ids: list[str]) -> list:
        """The ReplicaSet (or None) of each id, in one round trip."""
        from store._directory.replica_set import ReplicaSet

        if not object_ids:
            return []
        return [
            None if raw is None else ReplicaSet.decode(raw.decode())
            for raw in self.r.hmget(self.k_replicas, object_ids)
        ]

    def all_replica_sets(self) -> dict:
        """Every replicated object's ReplicaSet, by object id."""
        from store._directory.replica_set import ReplicaSet

        return {
            oid.decode(): ReplicaSet.decode(raw.decode()) for oid, raw in self.r.hscan_iter(self.k_replicas, count=1000)
        }

    def replace_replica_set(self, object_id: str, expected_epoch: int, expected_primary: str, new: Any) -> bool:
        """Compare-and-set of an object's replica set (and owner, if ``new.primary`` differs).

        True if the directory still had ``expected_epoch`` (0: no set) and named
        ``expected_primary`` as owner; False if anything changed meanwhile.
        Raises ObjectNotFound if the object is gone.
        """
        status = self._replica_cas(
            keys=[self.k_objects, self.k_replicas, self.prefix + "alive:" + expected_primary],
            args=[object_id, expected_epoch, expected_primary, new.encode(), new.primary],
        )
        if status == b"missing":
            raise ObjectNotFound(f"no object with id {object_id}")
        return status == b"ok"

    def count_objects(self) -> int:
        return self.r.hlen(self.k_objects)

    def objects_of(self, backend_id: str) -> dict[str, ObjectEntry]:
        out = {}
        for oid, raw in self.r.hscan_iter(self.k_objects, count=1000):
            e = _entry(raw)
            if e.backend_id == backend_id:
                out[oid.decode()] = e
        return out

    # -- backends ------------------------------------------------------------------
    def register_backend(self, backend_id: str, info: dict, ttl: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.k_backends, backend_id, self.keys.seal_backend(backend_id, info))
        pipe.set(self.prefix + "alive:" + backend_id, "1", px=int(ttl * 1000))
        pipe.execute()

    def unregister_backend(self, backend_id: str, info: dict | None = None) -> None:
        """Shown down at once; ``info`` (marked stopped) tells clients it stopped on
        purpose, so they keep retrying a restart instead of giving up on a lost host."""
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self.prefix + "alive:" + backend_id)
        if info is not None:
            pipe.hset(self.k_backends, backend_id, self.keys.seal_backend(backend_id, dict(info, stopped=True)))
        pipe.execute()

    def forget_backend(self, backend_id: str) -> None:
        """Remove a backend's entry for good (``claypot forget``): it is no longer listed."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(self.k_backends, backend_id)
        pipe.delete(self.prefix + "alive:" + backend_id)
        pipe.execute()

    def backends(self) -> list[dict]:
        raw = self.r.hgetall(self.k_backends)
        ids = [k.decode() for k in raw]
        alive = self.r.mget([self.prefix + "alive:" + i for i in ids]) if ids else []
        out = []
        for i, flag in zip(ids, alive):
            try:
                info = self.keys.open_backend(i, raw[i.encode()].decode("utf-8", "replace"))
            except TamperedEntry as exc:
                # Not written by a token holder: never hand its address to a client.
                log.warning("ignoring backend entry: %s", exc)
                continue
            info["backend_id"] = i
            info["up"] = flag is not None
            out.append(info)
        out.sort(key=lambda b: (b.get("started", 0), b["backend_id"]))
        return out

    # -- code ------------------------------------------------------------------------
    def put_code(self, key: str, code: bytes) -> None:
        """Register code under ``key`` (first writer wins; a forged entry is replaced)."""
        sealed = self.keys.seal_code(key, code)
        if self.r.hsetnx(self.k_code, key, sealed):
            return
        existing = self.r.hget(self.k_code, key)
        try:
            self.keys.open_code(key, existing or b"")
        except TamperedEntry:
            # Someone without the token got there first: a token holder's code wins.
            self.r.hset(self.k_code, key, sealed)

    def get_code(self, key: str) -> bytes | None:
        """The code registered under ``key``, verified; None if there is none.

        An entry whose signature does not verify raises ClassNotFound: it is
        never returned, so it is never unpickled.
        """
        stored = self.r.hget(self.k_code, key)
        if stored is None:
            return None
        try:
            return self.keys.open_code(key, stored)
        except TamperedEntry as exc:
            log.warning("refusing code entry: %s", exc)
            raise ClassNotFound(
                f"{exc}: refusing to load it (was the registry written by something without the cluster token?)"
            ) from None

    def code_keys(self) -> list[str]:
        """Every key of the code registry (classes and task functions)."""
        return [k.decode() if isinstance(k, bytes) else k for k in self.r.hkeys(self.k_code)]

    def has_code(self, key: str) -> bool:
        return bool(self.r.hexists(self.k_code, key))

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.r.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
