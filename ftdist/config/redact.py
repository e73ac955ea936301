"""Secrets kept out of logs, snapshots, tracker parameters and messages: values of secret-looking
keys, and every URL's userinfo and query values."""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = ("secret", "password", "access_key", "credential", "api_key")


def is_secret_key(key: Any) -> bool:
    key = str(key).lower()
    return any(w in key for w in SECRET_WORDS) or key == "token" or key.endswith("_token")


# Every URL a user gives may carry a credential: in its userinfo (user:password@) or in any query
# value (?token=..., &apikey=..., &sig=...: no list of key names can know them all). Each is
# replaced wherever a URL is shown, logged, snapshotted or sent to a tracker; the host, path and
# the query's keys stay, so the message still says where.
_URL = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>`]+"""  # scheme://...
                  r"""|(?<![\w.~-])/[^\s'"<>`?]*\?[^\s'"<>`]*=[^\s'"<>`]*""")  # /path?key=value (a client's "url:")


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")


_QUERY_VALUE = re.compile(r"(?P<key>(?:^|&|;)[^=&;#]*)=(?P<value>[^&;#]*)")


REDACTED = "***"


def redact_url(text: str) -> str:
    """`text` with the credentials every URL in it can carry replaced: its userinfo
    (http://user:pass@host -> http://***@host) and every query value (?apikey=k&x=1 ->
    ?apikey=***&x=***), whatever the keys are named."""
    if not isinstance(text, str) or ("://" not in text and "?" not in text):
        return text
    return _URL.sub(lambda m: _redact_one(m.group(0)), text)


def _redact_one(url: str) -> str:
    trail = len(url) - len(url.rstrip(".,;:)]}!"))  # the sentence's punctuation, not the URL's
    if trail:
        return _redact_one(url[:-trail]) + url[-trail:]
    url = _USERINFO.sub(rf"\g<scheme>{REDACTED}@", url)
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = rest.partition("#")
    if "=" not in query:  # a glob's ? (s3://bucket/part-?.jsonl), not a query
        return url
    query = _QUERY_VALUE.sub(lambda m: f"{m['key']}={REDACTED}" if m["value"] else m.group(0), query)
    return f"{head}?{query}{hash_}{fragment}"


def redacted(data: Any) -> Any:
    """A copy with values of secret-looking keys, and credentials inside URLs, replaced: for
    snapshots, logs and trackers."""
    if isinstance(data, dict):
        return {
            k: ("***" if v is not None and is_secret_key(k) else redacted(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return redact_url(data)
    return data
