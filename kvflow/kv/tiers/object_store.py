"""G4: KV records in an S3-compatible object store, shared by every worker of a model.

`--kv-object-store s3://bucket/prefix` names the place; keys are
`<prefix>/<identity>/<sequence hash hex>`, so any worker of the same model and layout
finds the blocks another one wrote. The endpoint and credentials come from the usual
AWS settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) unless given. Timeouts are
short and retries off: a store that is down or slow raises `TierUnavailable`
(`unreachable`, `timeout`) and the tier manager skips it rather than stall serving.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from kvflow.kv.tiers.store import TierUnavailable


@dataclass(frozen=True)
class ObjectStoreUrl:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> ObjectStoreUrl:
        parts = urlparse(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"--kv-object-store must look like s3://bucket/prefix, got {url!r}")
        return cls(parts.netloc, parts.path.strip("/"))


class S3Store:
    """Blocks as objects; a local set remembers which ones this worker has seen there."""

    tier = "object"
    shared = True

    def __init__(
        self,
        url: str,
        identity_key: str,
        *,
        endpoint_url: str | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.location = ObjectStoreUrl.parse(url)
        base = f"{self.location.prefix}/" if self.location.prefix else ""
        self._prefix = f"{base}{identity_key}/"
        config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                        retries={"max_attempts": 1, "mode": "standard"})
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._known: set[int] = set()
        self._lock = threading.Lock()

    def _key(self, seq_hash: int) -> str:
        return f"{self._prefix}{seq_hash:016x}"

    def _call(self, what: str, fn, **kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        try:
            return fn(Bucket=self.location.bucket, **kwargs)
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise TierUnavailable("object", "timeout", f"{what}: {exc}") from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise TierUnavailable("object", "error", f"{what}: {code} {exc}") from exc
        except BotoCoreError as exc:
            raise TierUnavailable("object", "unreachable", f"{what}: {exc}") from exc

    def contains(self, seq_hash: int) -> bool:
        if seq_hash in self._known:
            return True
        found = self._call("head", self._client.head_object, Key=self._key(seq_hash)) is not None
        if found:
            with self._lock:
                self._known.add(seq_hash)
        return found

    def get(self, seq_hash: int) -> bytes | None:
        reply = self._call("get", self._client.get_object, Key=self._key(seq_hash))
        if reply is None:
            self._known.discard(seq_hash)
            return None
        try:
            data = reply["Body"].read()
        except OSError as exc:
            raise TierUnavailable("object", "unreachable", f"get body: {exc}") from exc
        with self._lock:
            self._known.add(seq_hash)
        return data

    def put(self, seq_hash: int, record: bytes) -> bool:
        if seq_hash in self._known:
            return True  # content-addressed: the same hash holds the same block
        self._call("put", self._client.put_object, Key=self._key(seq_hash), Body=record)
        with self._lock:
            self._known.add(seq_hash)
        return True

    def discard(self, seq_hash: int) -> None:
        with self._lock:
            self._known.discard(seq_hash)
        self._call("delete", self._client.delete_object, Key=self._key(seq_hash))

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (tests and first use); errors as usual."""
        if self._call("head bucket", self._client.head_bucket) is None:
            self._client.create_bucket(Bucket=self.location.bucket)
