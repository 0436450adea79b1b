"""SecAgg+ secure summation (Bell et al. 2020, as Flower's ``SecAggPlusWorkflow`` runs it), free of Flower messages.

Why our own: Flower 1.41's runs only in the legacy strategy stack, uploads int64 and derives each mask from a 32-bit
MT19937 seed. Here masks are AES-256-CTR streams keyed through HKDF-SHA256, uploads are uint32, the stochastic
rounding uses the caller's seeded generator (so the unmasked sum is reproducible), and only bytes, ints, lists/dicts
of them and numpy arrays cross the wire. Flower's Shamir helpers and share packing are reused.

One round (a node that does not reply has dropped)::

    server = SecAggServer(params, node_ids, context)
    0  c = SecAggClient.setup(node_id, params, context, roster); c.public_keys -> server.share_keys_requests({id: keys})
    1  c.share_keys(keys, vks) -> ({dst: ct}, commitment)  ->  server.masked_input_requests({id: cts}, {id: commit})
    2  c.masked_input(cts, x) -> uint32 vector                         ->  server.sign_requests({id: vector}) -> U3
    3  c.sign(U3) -> signature                                         ->  server.unmask_requests({id: signature})
    4  c.unmask(surviving, dropped, signatures) -> {owner: share}     ->  server.aggregate({id: shares}) -> sum

Stage 1's ``keys`` are the node's share holders' keys (``server.share_keys_requests``) and ``vks`` every live
node's signing key (``server.verification_keys()``): a client verifies signatures only with keys it received at
key agreement, before anyone could know who would drop.

Between stages a client lives in ``to_state()``, a dict a Flower ConfigRecord holds. ``context`` (e.g. run id +
round) must be the same bytes for all parties of a round; every derived key is bound to it.

Quantisation: x is clipped to [-c, c] and stochastically rounded onto [0, T], T = 2**quantization_bits (the rounding
draws from the client's own entropy unless the caller passes a generator). Each client
errs by less than one quantum 2c/T, so per coordinate the dequantised sum of n survivors is within n * 2c/T of the
sum of the clipped inputs (``SecAggParams.error_bound``), plus the clipping error of values beyond +-c; n * T < 2**32
keeps the sum exact mod 2**32. Callers weight x themselves (and append the weight if the server needs its sum).

Security. Per node a client reveals its seed share or its sk1 share, never both, even across requests, and the
threshold is a strict majority of each node's k holders. Against a server that lies about who dropped (Bonawitz et
al. 2017's malicious setting, their ConsistencyCheck round adapted to SecAgg+'s graph): every survivor signs the
one survivor set U3 it is told (Ed25519, every node's key pinned at key agreement; once per round), and a holder reveals
shares only for a U3 signed by a strict majority of the round's roster, which it signed itself, with its own held
nodes split into surviving / dropped exactly by U3. Two different stories can therefore never both be signed, and
what the server can unmask is the sum over one U3 of at least max(3, threshold) clients. Not covered: a server that
substitutes public keys (there is no PKI binding keys to sites; it could then impersonate clients), sybil nodes
(see docs/deployment.md on who may register a node), and what the sum itself reveals (combine with DP).
Reconstructed secrets are checked (a seed against its commitment, an sk1 against its public key), so a wrong or
duplicated share is outvoted while enough good ones remain, and the unmasked sum is range-checked: a sum outside
what the survivors' quantised inputs can give aborts the round. A client that shifts its own vector within that
range moves the sum by at most its share of the clip range, as any client can with its input (bound updates
with DP or a norm bound, not with SecAgg).
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate

StateValue = bytes | int | str | list[int] | list[bytes]
Keys = tuple[bytes, bytes, bytes]  # (pk1 for pairwise masks, pk2 for sealing shares, vk for signatures)
_CURVE = ec.SECP384R1()
_INFO = b"fedtt-secagg"


class SecAggAbort(RuntimeError):
    """Too few live share holders to unmask some node: the caller skips the round and keeps the global model."""


@dataclass(frozen=True)
class SecAggParams:
    """What server and clients agree on for a round; both sides validate it, so a bad config fails before any crypto.

    num_shares >= num_clients means plain SecAgg (every node shares with all). Otherwise it is the odd ring window
    k (the node and k - 1 neighbours). threshold must be a strict majority of the k holders (see the module
    docstring) and below k, so that every node tolerates at least one dropped holder.
    """

    num_clients: int
    num_shares: int
    threshold: int
    clip_range: float
    quantization_bits: int = 22

    def __post_init__(self) -> None:
        n, k, t, c, b = self.num_clients, self.num_shares, self.threshold, self.clip_range, self.quantization_bits
        if n < 3:
            raise ValueError(f"num_clients={n}: secure aggregation needs at least 3 clients")
        if k < 3 or (k < n and k % 2 == 0):
            raise ValueError(f"num_shares={k}: must be odd and >= 3, or >= num_clients={n} for full SecAgg")
        if not self.shares / 2 < t < self.shares:
            raise ValueError(f"threshold={t}: must be a strict majority of the {self.shares} share holders and "
                             f"below it, i.e. in [{self.shares // 2 + 1}, {self.shares - 1}]")
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"clip_range={c}: must be finite and > 0")
        if b < 1 or n * 2**b >= 2**32:
            raise ValueError(f"quantization_bits={b} with num_clients={n}: need quantization_bits >= 1 and "
                             "num_clients * 2**quantization_bits < 2**32 (uint32 sum)")

    @property
    def shares(self) -> int:
        """Share holders per node, the node itself included."""
        return min(self.num_shares, self.num_clients)

    @property
    def quantum(self) -> float:
        return 2 * self.clip_range / 2**self.quantization_bits

    def error_bound(self, n: int) -> float:
        """Per-coordinate bound on |dequantised sum - sum of the clipped inputs| for n survivors."""
        return n * self.quantum


def ring_neighbours(node_ids: Sequence[int], num_shares: int) -> dict[int, list[int]]:
    """SecAgg+ graph: each node's num_shares - 1 neighbours around a ring shuffled from the OS's entropy (Bell et
    al.'s bound against colluding clients assumes nobody can predict it), or everyone else."""
    ring = sorted(node_ids)
    secrets.SystemRandom().shuffle(ring)
    n = len(ring)
    if num_shares >= n:
        return {v: sorted(set(ring) - {v}) for v in ring}
    half = num_shares // 2
    return {v: sorted(ring[(i + o) % n] for o in range(-half, half + 1) if o) for i, v in enumerate(ring)}


def survivors_statement(context: bytes, roster: Sequence[int], survivors: Sequence[int], max_weight: int) -> bytes:
    """What a survivor signs: the round, its roster, the survivor set and the weights' common scale."""
    pack = b"".join(int(i).to_bytes(8, "big") for i in sorted(roster)) + b"|" + \
        b"".join(int(i).to_bytes(8, "big") for i in sorted(survivors))
    return b"fedtt-secagg-survivors|" + context + b"|" + pack + b"|" + int(max_weight).to_bytes(8, "big")


def commitment(seed: bytes, context: bytes) -> bytes:
    """Binds a client to its self-mask seed without revealing it (the seed is 32 random bytes)."""
    return hashlib.sha256(b"fedtt-secagg-seed|" + context + seed).digest()


def public_key_of(sk1: bytes) -> bytes | None:
    try:
        key = ec.derive_private_key(int.from_bytes(sk1, "big"), _CURVE)
    except ValueError:
        return None
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def _kdf(secret: bytes, context: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + context).derive(secret)


def prg(secret: bytes, context: bytes, length: int) -> np.ndarray:
    """Mask stream: AES-256-CTR keyed by HKDF-SHA256(secret, b"fedtt-secagg" + context), as little-endian uint32.

    A zero nonce is safe: each derived key encrypts a single stream, and all secrets are fresh every round.
    """
    encryptor = Cipher(algorithms.AES(_kdf(secret, context)), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def _key_pair() -> tuple[bytes, bytes]:
    """(48-byte scalar, 49-byte compressed point): a fraction of PEM's size, and the scalar is what gets shared."""
    sk = ec.generate_private_key(_CURVE)
    return (sk.private_numbers().private_value.to_bytes(48, "big"),
            sk.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint))


def _ecdh(sk: bytes, peer_pk: bytes) -> bytes:
    private = ec.derive_private_key(int.from_bytes(sk, "big"), _CURVE)
    return private.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, peer_pk))


def pairwise_mask(sk1: bytes, peer_pk1: bytes, node_id: int, peer_id: int, context: bytes, length: int) -> np.ndarray:
    """The mask node_id adds for peer_id: +PRG(s) if node_id < peer_id else -PRG(s), s = ECDH(sk1, peer_pk1).

    Both ends derive the same s, so a pair's masks cancel in the sum; the server cancels what survivors added for
    a dropped node by adding the dropped node's side, computed from its reconstructed sk1.
    """
    mask = prg(_ecdh(sk1, peer_pk1), b"pair" + context, length)
    return mask if node_id < peer_id else np.negative(mask)


def _quantize(x: np.ndarray, params: SecAggParams, rng: np.random.Generator | None) -> np.ndarray:
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    c = params.clip_range
    # In [0, T] exactly: clip(x) + c <= 2c in floating point, and T is a power of two.
    y = (np.clip(x, -c, c) + c) / (2 * c) * 2**params.quantization_bits
    low = np.floor(y)
    return (low + (rng.random(y.shape) < y - low)).astype(np.uint32)


@dataclass(repr=False)  # no secrets in logs or tracebacks
class SecAggClient:
    """One node's side of one round. Its fields are its whole state, so it can leave memory between stages."""

    node_id: int
    params: SecAggParams
    context: bytes
    sk1: bytes
    pk1: bytes
    sk2: bytes
    pk2: bytes
    sk3: bytes  # Ed25519 signing key of the consistency round
    vk: bytes
    roster: list[int] = field(default_factory=list)  # the round's nodes, as told at setup
    stage: str = "setup"  # -> "shared" -> "masked" -> "signed"
    seed: bytes = b""  # b_i, the self-mask seed
    max_weight: int = 0  # the weights' common scale this node masked with
    key_ids: list[int] = field(default_factory=list)  # the share holders, this node included, sorted
    key_pk1: list[bytes] = field(default_factory=list)
    key_pk2: list[bytes] = field(default_factory=list)
    key_vk: list[bytes] = field(default_factory=list)
    vk_ids: list[int] = field(default_factory=list)  # every live node's signing key, as received at key agreement
    vk_keys: list[bytes] = field(default_factory=list)
    share_ids: list[int] = field(default_factory=list)  # the nodes whose shares this node holds
    seed_shares: list[bytes] = field(default_factory=list)
    sk1_shares: list[bytes] = field(default_factory=list)
    signed: list[int] = field(default_factory=list)  # the survivor set this node signed
    revealed_seed: list[int] = field(default_factory=list)
    revealed_sk1: list[int] = field(default_factory=list)

    @classmethod
    def setup(cls, node_id: int, params: SecAggParams, context: bytes, roster: Sequence[int]) -> SecAggClient:
        """Stage 0: fresh key pairs for this round only, so no mask or sealing key ever repeats across rounds."""
        roster = sorted(int(i) for i in roster)
        if node_id not in roster or len(roster) != params.num_clients or len(set(roster)) != len(roster):
            raise ValueError(f"setup: the roster has {len(roster)} distinct nodes for num_clients="
                             f"{params.num_clients} and must include this node")
        signing = ed25519.Ed25519PrivateKey.generate()
        return cls(node_id, params, context, *_key_pair(), *_key_pair(),
                   signing.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
                   signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw), roster)

    @property
    def public_keys(self) -> Keys:
        return self.pk1, self.pk2, self.vk

    def share_keys(self, public_keys: Mapping[int, Sequence[bytes]],
                   vks: Mapping[int, bytes] | None = None) -> tuple[dict[int, bytes], bytes]:
        """Stage 1: Shamir-split b_i and sk1_i over the holders, and seal each neighbour's two shares to it;
        returns the sealed shares and a commitment to b_i (so a wrong share cannot pass for the right seed).
        ``vks``: every live node's signing key (default: the holders' only, enough in full SecAgg); the
        consistency round accepts signatures under these keys only.

        More holders than num_shares would void the majority argument of the threshold, so they are refused.
        """
        self._expect("setup", "share_keys")
        ids, t, k = sorted(public_keys), self.params.threshold, self.params.shares
        if tuple(public_keys.get(self.node_id, ())) != self.public_keys:
            raise ValueError("share_keys: this node's own public keys are missing or altered")
        if not t <= len(ids) <= k or not set(ids) <= set(self.roster):
            raise ValueError(f"share_keys: {len(ids)} share holders, need threshold={t} <= holders <= {k}, all in "
                             "the round's roster")
        if len({pk for keys in public_keys.values() for pk in keys}) != 3 * len(ids):
            raise ValueError("share_keys: the public keys are not all distinct")
        self.seed = os.urandom(32)
        self.key_ids = ids
        self.key_pk1, self.key_pk2, self.key_vk = ([bytes(public_keys[i][j]) for i in ids] for j in range(3))
        pinned = {i: bytes(v) for i, v in (vks or {}).items() if i in self.roster} | dict(zip(ids, self.key_vk))
        if any(bytes((vks or {}).get(i, pinned[i])) != pinned[i] for i in ids):
            raise ValueError("share_keys: a share holder's signing key differs between the two key lists")
        self.vk_ids, self.vk_keys = sorted(pinned), [pinned[i] for i in sorted(pinned)]
        sealed = {}
        shares = zip(ids, self.key_pk2, create_shares(self.seed, t, len(ids)), create_shares(self.sk1, t, len(ids)))
        for nid, pk2, seed_share, sk1_share in shares:
            if nid == self.node_id:
                self._keep(nid, seed_share, sk1_share)
            else:
                plaintext = share_keys_plaintext_concat(self.node_id, nid, seed_share, sk1_share)
                sealed[nid] = self._fernet(pk2).encrypt(plaintext)
        self.stage = "shared"
        return sealed, commitment(self.seed, self.context)

    def masked_input(self, ciphertexts: Mapping[int, bytes], x: np.ndarray, max_weight: int = 1,
                     rng: np.random.Generator | None = None) -> np.ndarray:
        """Stage 2: keep the shares sealed to this node; return quantise(x) + PRG(b_i) + pairwise masks, mod 2**32.

        It masks with exactly the senders of ciphertexts (the server forwards only mutual pairs). It runs once per
        round: two vectors under the same masks would reveal the difference of their inputs. ``max_weight``: the
        scale the caller weighted x with, which every survivor must sign the same (stage 3). ``rng`` (stochastic
        rounding): the OS's entropy unless given.
        """
        self._expect("shared", "masked_input")
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"masked_input: x must be 1-D, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("masked_input: x has non-finite values (NaN or inf)")
        senders = sorted(ciphertexts)
        strangers = set(senders) - (set(self.key_ids) - {self.node_id})
        if strangers:
            raise ValueError(f"masked_input: ciphertexts from nodes {sorted(strangers)} that are not neighbours")
        if len(senders) + 1 < self.params.threshold:
            raise ValueError(f"masked_input: {len(senders)} senders + this node < threshold={self.params.threshold}")
        opened = []
        for src in senders:
            pk2 = self.key_pk2[self.key_ids.index(src)]
            plaintext = self._fernet(pk2).decrypt(ciphertexts[src])
            owner, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
            if (owner, dst) != (src, self.node_id):
                raise ValueError(f"masked_input: the ciphertext from node {src} was sealed by {owner} for {dst}")
            opened.append((src, seed_share, sk1_share))
        for share in opened:
            self._keep(*share)
        masked = _quantize(x, self.params, rng) + prg(self.seed, b"self" + self.context, x.size)
        for src in senders:
            pk1 = self.key_pk1[self.key_ids.index(src)]
            masked += pairwise_mask(self.sk1, pk1, self.node_id, src, self.context, x.size)
        self.max_weight = int(max_weight)
        self.stage = "masked"
        return masked

    def sign(self, survivors: Sequence[int], min_clients: int = 3) -> bytes:
        """Stage 3 (consistency): sign the survivor set U3 the server announces, once per round.

        U3 must hold this node, lie in the roster, be a strict majority of it and have at least
        max(3, threshold, min_clients) nodes (a sum over fewer is too close to one client's update)."""
        self._expect("masked", "sign")
        self._check_survivors(survivors, min_clients)
        self.signed = sorted(int(i) for i in survivors)
        self.stage = "signed"
        key = ed25519.Ed25519PrivateKey.from_private_bytes(self.sk3)
        return key.sign(survivors_statement(self.context, self.roster, self.signed, self.max_weight))

    def unmask(self, surviving: Sequence[int], dropped: Sequence[int],
               signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """Stage 4: seed shares of the surviving nodes and sk1 shares of the dropped ones, never both for one node,
        and only for the survivor set this node signed, when a strict majority of the roster signed it too.

        ``surviving`` / ``dropped``: the held nodes the server names; they must be exactly the held nodes in and
        out of the signed set. ``signatures``: survivor -> its signature, checked with the key pinned at key
        agreement. The refusal holds across calls too.
        """
        self._expect("signed", "unmask")
        alive, gone, signed = set(surviving), set(dropped), set(self.signed)
        if alive != set(self.share_ids) & signed or gone != set(self.share_ids) - signed:
            raise ValueError("unmask: the surviving / dropped nodes named are not the held nodes in / out of the "
                             "survivor set this node signed")
        statement = survivors_statement(self.context, self.roster, self.signed, self.max_weight)
        valid = {i for i, sig in signatures.items() if i in signed and self._verify(i, sig, statement)}
        if 2 * len(valid) <= len(self.roster) or len(valid) < self.params.threshold:
            raise ValueError(f"unmask: {len(valid)} valid signatures on this node's survivor set, need a strict "
                             f"majority of the {len(self.roster)} nodes of the round and threshold="
                             f"{self.params.threshold}")
        both = alive & set(self.revealed_sk1) | gone & set(self.revealed_seed)
        if both:
            raise ValueError(f"unmask: refusing to reveal both the seed and the sk1 shares of nodes {sorted(both)}")
        self.revealed_seed = sorted(alive | set(self.revealed_seed))
        self.revealed_sk1 = sorted(gone | set(self.revealed_sk1))
        index = {nid: i for i, nid in enumerate(self.share_ids)}
        return ({nid: self.seed_shares[index[nid]] for nid in sorted(alive)}
                | {nid: self.sk1_shares[index[nid]] for nid in sorted(gone)})

    def _check_survivors(self, survivors: Sequence[int], min_clients: int) -> None:
        u3, floor = set(int(i) for i in survivors), max(3, self.params.threshold, min_clients)
        if self.node_id not in u3 or not u3 <= set(self.roster):
            raise ValueError("sign: the survivor set must include this node and lie in the round's roster")
        if 2 * len(u3) <= len(self.roster) or len(u3) < floor:
            raise ValueError(f"sign: {len(u3)} survivors of {len(self.roster)}: need a strict majority and at least "
                             f"{floor}")

    def _verify(self, node: int, signature: bytes, statement: bytes) -> bool:
        if node not in self.vk_ids:
            return False
        try:
            vk = self.vk_keys[self.vk_ids.index(node)]
            ed25519.Ed25519PublicKey.from_public_bytes(vk).verify(bytes(signature), statement)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def to_state(self) -> dict[str, StateValue]:
        """ConfigRecord-compatible: the params inline, clip_range as ``float.hex`` (exact), the rest as it is."""
        state = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        p = self.params
        state |= {"num_clients": p.num_clients, "num_shares": p.num_shares, "threshold": p.threshold,
                  "clip_range": float(p.clip_range).hex(), "quantization_bits": p.quantization_bits}
        return {k: list(v) if isinstance(v, list) else v for k, v in state.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, StateValue]) -> SecAggClient:
        values = {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
        params = {f.name: values.pop(f.name) for f in fields(SecAggParams)}
        params["clip_range"] = float.fromhex(params["clip_range"])
        return cls(params=SecAggParams(**params), **values)

    def _expect(self, stage: str, step: str) -> None:
        if self.stage != stage:
            raise ValueError(f"{step}: expects stage {stage!r}, the client is at stage {self.stage!r}")

    def _keep(self, owner: int, seed_share: bytes, sk1_share: bytes) -> None:
        self.share_ids.append(owner)
        self.seed_shares.append(seed_share)
        self.sk1_shares.append(sk1_share)

    def _fernet(self, peer_pk2: bytes) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(_kdf(_ecdh(self.sk2, peer_pk2), b"seal" + self.context)))


class SecAggServer:
    """Server side of one round; it stays in the strategy's memory, so its state needs no serialisation.

    Each method takes one stage's replies (node id -> reply; a node without a reply has dropped) and returns the
    next stage's requests. It raises SecAggAbort as soon as some node's secrets could no longer be recovered, or
    when what the clients sent cannot be a valid round (an out-of-range sum, secrets that do not reconstruct).
    """

    def __init__(self, params: SecAggParams, node_ids: Sequence[int], context: bytes) -> None:
        if len(node_ids) != params.num_clients or len(set(node_ids)) != len(node_ids):
            raise ValueError(f"node_ids: need num_clients={params.num_clients} distinct ids, got {len(node_ids)} "
                             f"with {len(set(node_ids))} distinct")
        self.params, self.context, self.roster = params, context, sorted(node_ids)
        self.neighbours = ring_neighbours(node_ids, params.num_shares)
        self._holders = {j: {j, *nb} for j, nb in self.neighbours.items()}  # who holds (will hold) j's shares
        self._live, self._stage = set(node_ids), 0
        self._keys: dict[int, tuple[bytes, bytes, bytes]] = {}
        self._commitments: dict[int, bytes] = {}
        self._shared: set[int] = set()  # U1: nodes whose secrets were shared, to unmask or to cancel
        self._survivors: set[int] = set()  # U3: nodes whose masked vectors are in the sum
        self._asked: dict[int, set[int]] = {}
        self._sum = np.zeros(0, np.uint32)
        self.signatures: dict[int, bytes] = {}

    def share_keys_requests(self, public_keys: Mapping[int, Sequence[bytes]]) -> dict[int, dict[int, Keys]]:
        """Stage 0 replies (pk1, pk2, vk) -> each node's holders' keys, its own included so it can check them."""
        live = self._advance(0, public_keys)
        self._keys = {j: tuple(bytes(k) for k in public_keys[j]) for j in live}
        self._holders = {j: self._holders[j] & live for j in live}
        self._check(live, live)
        return {j: {h: self._keys[h] for h in sorted(self._holders[j])} for j in sorted(live)}

    def masked_input_requests(self, ciphertexts: Mapping[int, Mapping[int, bytes]],
                              commitments: Mapping[int, bytes]) -> dict[int, dict[int, bytes]]:
        """Stage 1 replies {src: {dst: ct}} -> {dst: {src: ct}}, for mutual pairs only, so masks always cancel."""
        live = self._advance(1, ciphertexts)
        self._commitments = {j: bytes(commitments[j]) for j in live}
        sent = {src: set(ciphertexts[src]) & self._holders[src] & live - {src} for src in live}
        forward = {dst: {src: ciphertexts[src][dst] for src in sorted(sent[dst]) if dst in sent[src]}
                   for dst in sorted(live)}
        self._holders = {j: {j} | {h for h in live if j in forward[h]} for j in live}
        self._shared = live
        self._check(live, live)
        return forward

    def sign_requests(self, masked: Mapping[int, np.ndarray]) -> list[int]:
        """Stage 2 replies (masked vectors) -> the survivor set U3 that every survivor is asked to sign."""
        live = self._advance(2, masked)
        self._check(live, self._shared)
        shape = np.shape(masked[min(live)])
        self._sum = np.zeros(shape, np.uint32)
        for j in sorted(live):
            vector = np.asarray(masked[j])
            if vector.dtype != np.uint32 or vector.ndim != 1 or vector.shape != shape:
                raise SecAggAbort(f"masked vector of node {j}: need 1-D uint32 of shape {shape}, "
                                  f"got {vector.dtype} {vector.shape}")
            self._sum += vector  # wraps mod 2**32
        self._survivors = live
        return sorted(live)

    def unmask_requests(self, signatures: Mapping[int, bytes], max_weight: int) -> dict[int, tuple[list[int],
                                                                                                   list[int]]]:
        """Stage 3 replies (signatures on U3) -> each signer's (surviving, dropped) nodes among those it holds.
        Signatures that do not verify are left out; the signers must be a strict majority of the roster."""
        live = self._advance(3, signatures)
        statement = survivors_statement(self.context, self.roster, sorted(self._survivors), max_weight)
        self.signatures = {j: bytes(sig) for j, sig in signatures.items() if self._verifies(j, sig, statement)}
        signers = set(self.signatures)
        if 2 * len(signers) <= len(self.roster) or len(signers) < self.params.threshold:
            raise SecAggAbort(f"{len(signers)} valid signatures on the survivor set: need a strict majority of the "
                              f"{len(self.roster)} nodes and threshold={self.params.threshold}; skip the round")
        self._live = live & signers
        self._check(self._live, self._shared)
        self._asked = {h: {j for j in self._shared if h in self._holders[j]} for h in self._live}
        return {h: (sorted(self._asked[h] & self._survivors), sorted(self._asked[h] - self._survivors))
                for h in sorted(self._live)}

    def verification_keys(self) -> dict[int, bytes]:
        """Every live node's signing key, sent to all at key agreement (stage 1)."""
        return {j: self._keys[j][2] for j in sorted(self._keys)}

    def aggregate(self, shares: Mapping[int, Mapping[int, bytes]]) -> np.ndarray:
        """Stage 4 replies {holder: {owner: share}} -> the float64 sum of the survivors' clipped inputs."""
        live = self._advance(4, shares)
        survivors, t, n = self._survivors, self.params.threshold, self._sum.size
        collected: dict[int, list[bytes]] = {j: [] for j in self._shared}
        for h in sorted(live):
            for owner, share in shares[h].items():
                if owner in self._asked.get(h, ()) and share not in collected[owner]:
                    collected[owner].append(bytes(share))
        short = sorted(j for j, got in collected.items() if len(got) < t)
        if short:
            raise SecAggAbort(f"unmask: fewer than threshold={t} shares for nodes {short}; skip the round")
        total = self._sum.copy()
        for j, got in sorted(collected.items()):
            secret = self._reconstruct(j, got, j in survivors)
            if j in survivors:
                total -= prg(secret, b"self" + self.context, n)
            else:
                for h in sorted(self._holders[j] & survivors):
                    total += pairwise_mask(secret, self._keys[h][0], j, h, self.context, n)
        top = len(survivors) * 2**self.params.quantization_bits
        if (total > top).any():
            raise SecAggAbort(f"the unmasked sum has {int((total > top).sum())} values above what {len(survivors)} "
                              "honest quantised inputs can give: a client sent an out-of-range vector; skip the round")
        return total.astype(np.float64) * self.params.quantum - len(survivors) * self.params.clip_range

    def _reconstruct(self, owner: int, shares: list[bytes], survivor: bool) -> bytes:
        """The owner's seed (survivor) or sk1 (dropped) from some t of its shares that checks out against its
        commitment or its public key. Wrong shares are outvoted by trying other subsets: first every window of t
        consecutive shares around the list (one wrong share leaves m - t of them clean), then up to 64 others."""
        t, m = self.params.threshold, len(shares)
        windows = ([shares[(start + j) % m] for j in range(t)] for start in range(m))
        for subset in itertools.chain(windows, itertools.islice(itertools.combinations(shares, t), 64)):
            try:
                secret = combine_shares(list(subset))  # pycryptodome wants exactly t shares
            except (ValueError, TypeError, IndexError):
                continue
            if (commitment(secret, self.context) == self._commitments.get(owner) if survivor
                    else public_key_of(secret) == self._keys[owner][0]):
                return secret
        raise SecAggAbort(f"unmask: the shares of node {owner} do not reconstruct its secret; skip the round")

    def _verifies(self, node: int, signature: bytes, statement: bytes) -> bool:
        if node not in self._survivors:
            return False
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self._keys[node][2]).verify(bytes(signature), statement)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def _advance(self, stage: int, replies: Mapping[int, object]) -> set[int]:
        if stage != self._stage:
            raise RuntimeError(f"SecAggServer: stage {stage} called, but stage {self._stage} is next")
        strangers = set(replies) - self._live
        if strangers:
            raise SecAggAbort(f"replies from nodes {sorted(strangers)} that were not asked in stage {stage}")
        self._stage, self._live = stage + 1, set(replies)
        return self._live

    def _check(self, live: set[int], nodes: set[int]) -> None:
        t = self.params.threshold
        short = sorted(j for j in nodes if len(self._holders[j] & live) < t)
        if len(live) < max(t, 3) or short:
            raise SecAggAbort(f"{len(live)} live nodes, and nodes {short} have fewer than threshold={t} live share "
                              "holders; skip the round")
