"""sha512-crypt ("$6$", Drepper's SHA-crypt as in glibc) in pure Python.

Why not a tool: `crypt` left the stdlib in 3.13 (Fedora's python3 is 3.13+), `mkpasswd`
is in Debian's optional `whois` package, and `openssl` is not in every minimal image;
users must be created without depending on what the image happens to ship (cOS #165).
The tests check the output against `openssl passwd -6` byte for byte.
"""
from __future__ import annotations

import hashlib
import secrets

ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ROUNDS_DEFAULT = 5000


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def _b64(data: bytes) -> str:
    """glibc's byte permutation for SHA-512, then 6 bits per character, low bits first."""
    out = []
    for i in range(21):
        a, b, c = data[i], data[i + 21], data[i + 42]
        triple = ((a, b, c), (b, c, a), (c, a, b))[i % 3]
        w = (triple[0] << 16) | (triple[1] << 8) | triple[2]
        for _ in range(4):
            out.append(ITOA64[w & 0x3F])
            w >>= 6
    w = data[63]
    for _ in range(2):
        out.append(ITOA64[w & 0x3F])
        w >>= 6
    return "".join(out)


def sha512_crypt(password: str, salt: str | None = None, rounds: int = ROUNDS_DEFAULT) -> str:
    key = password.encode()
    salt_b = (salt if salt is not None else "".join(secrets.choice(ITOA64) for _ in range(16))).encode()[:16]
    b = hashlib.sha512(key + salt_b + key).digest()
    a = hashlib.sha512(key + salt_b)
    n = len(key)
    while n > 64:
        a.update(b)
        n -= 64
    a.update(b[:n])
    n = len(key)
    while n > 0:
        a.update(b if n & 1 else key)
        n >>= 1
    c = a.digest()
    p = _repeat(hashlib.sha512(key * len(key)).digest(), len(key))
    s = _repeat(hashlib.sha512(salt_b * (16 + c[0])).digest(), len(salt_b))
    for r in range(rounds):
        h = hashlib.sha512(p if r & 1 else c)
        if r % 3:
            h.update(s)
        if r % 7:
            h.update(p)
        h.update(c if r & 1 else p)
        c = h.digest()
    prefix = "$6$" if rounds == ROUNDS_DEFAULT else f"$6$rounds={rounds}$"
    return f"{prefix}{salt_b.decode()}${_b64(c)}"
