from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_OPEN: _ClassVar[RoundState]
    ROUND_SUM_READY: _ClassVar[RoundState]
    ROUND_FAILED: _ClassVar[RoundState]
    ROUND_WITHDRAWN: _ClassVar[RoundState]
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_OPEN: RoundState
ROUND_SUM_READY: RoundState
ROUND_FAILED: RoundState
ROUND_WITHDRAWN: RoundState

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("tensors", "num_params", "base_model_hash", "initial_model_hash")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    INITIAL_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_params: int
    base_model_hash: str
    initial_model_hash: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_params: _Optional[int] = ..., base_model_hash: _Optional[str] = ..., initial_model_hash: _Optional[str] = ...) -> None: ...

class EncodingParams(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "values_per_ciphertext")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUES_PER_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    values_per_ciphertext: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ..., values_per_ciphertext: _Optional[int] = ...) -> None: ...

class FederationSettings(_message.Message):
    __slots__ = ("key_fingerprint", "encoding", "min_participants", "round_timeout_seconds", "weight_unit", "max_ciphertexts_per_chunk", "layout_hash", "max_participants", "oldest_kept_round", "privacy", "optimizer", "masked")
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_UNIT_FIELD_NUMBER: _ClassVar[int]
    MAX_CIPHERTEXTS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    MAX_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_KEPT_ROUND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    key_fingerprint: str
    encoding: EncodingParams
    min_participants: int
    round_timeout_seconds: float
    weight_unit: float
    max_ciphertexts_per_chunk: int
    layout_hash: str
    max_participants: int
    oldest_kept_round: int
    privacy: PrivacySchedule
    optimizer: ServerOptimizer
    masked: bool
    def __init__(self, key_fingerprint: _Optional[str] = ..., encoding: _Optional[_Union[EncodingParams, _Mapping]] = ..., min_participants: _Optional[int] = ..., round_timeout_seconds: _Optional[float] = ..., weight_unit: _Optional[float] = ..., max_ciphertexts_per_chunk: _Optional[int] = ..., layout_hash: _Optional[str] = ..., max_participants: _Optional[int] = ..., oldest_kept_round: _Optional[int] = ..., privacy: _Optional[_Union[PrivacySchedule, _Mapping]] = ..., optimizer: _Optional[_Union[ServerOptimizer, _Mapping]] = ..., masked: _Optional[bool] = ...) -> None: ...

class PrivacySchedule(_message.Message):
    __slots__ = ("mode", "rounds", "sample_rate", "noise_multiplier", "steps_per_round", "max_grad_norm", "min_members", "colluders", "grid_bits", "dimension")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OFF: _ClassVar[PrivacySchedule.Mode]
        RECORD: _ClassVar[PrivacySchedule.Mode]
        MEMBER: _ClassVar[PrivacySchedule.Mode]
    OFF: PrivacySchedule.Mode
    RECORD: PrivacySchedule.Mode
    MEMBER: PrivacySchedule.Mode
    MODE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    COLLUDERS_FIELD_NUMBER: _ClassVar[int]
    GRID_BITS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    mode: PrivacySchedule.Mode
    rounds: int
    sample_rate: float
    noise_multiplier: float
    steps_per_round: int
    max_grad_norm: float
    min_members: int
    colluders: int
    grid_bits: int
    dimension: int
    def __init__(self, mode: _Optional[_Union[PrivacySchedule.Mode, str]] = ..., rounds: _Optional[int] = ..., sample_rate: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., steps_per_round: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., min_members: _Optional[int] = ..., colluders: _Optional[int] = ..., grid_bits: _Optional[int] = ..., dimension: _Optional[int] = ...) -> None: ...

class ServerOptimizer(_message.Message):
    __slots__ = ("name", "learning_rate", "beta1", "beta2", "tau")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    beta1: float
    beta2: float
    tau: float
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., tau: _Optional[float] = ...) -> None: ...

class RevocationListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationList(_message.Message):
    __slots__ = ("crl_pem",)
    CRL_PEM_FIELD_NUMBER: _ClassVar[int]
    crl_pem: bytes
    def __init__(self, crl_pem: _Optional[bytes] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("round", "withdrawal")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    withdrawal: bytes
    def __init__(self, round: _Optional[int] = ..., withdrawal: _Optional[bytes] = ...) -> None: ...

class WithdrawReply(_message.Message):
    __slots__ = ("round_continues",)
    ROUND_CONTINUES_FIELD_NUMBER: _ClassVar[int]
    round_continues: bool
    def __init__(self, round_continues: _Optional[bool] = ...) -> None: ...

class EnrolRequest(_message.Message):
    __slots__ = ("round", "enrolment")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENROLMENT_FIELD_NUMBER: _ClassVar[int]
    round: int
    enrolment: bytes
    def __init__(self, round: _Optional[int] = ..., enrolment: _Optional[bytes] = ...) -> None: ...

class EnrolReply(_message.Message):
    __slots__ = ("enrolled", "roster_deadline_unix")
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    ROSTER_DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    enrolled: int
    roster_deadline_unix: float
    def __init__(self, enrolled: _Optional[int] = ..., roster_deadline_unix: _Optional[float] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("round", "commit")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    round: int
    commit: bytes
    def __init__(self, round: _Optional[int] = ..., commit: _Optional[bytes] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("committed",)
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed: int
    def __init__(self, committed: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("round", "seed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    round: int
    seed: bytes
    def __init__(self, round: _Optional[int] = ..., seed: _Optional[bytes] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ProofRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class RoundProof(_message.Message):
    __slots__ = ("round", "nonce", "roster", "commits")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    round: int
    nonce: bytes
    roster: _containers.RepeatedScalarFieldContainer[bytes]
    commits: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., roster: _Optional[_Iterable[bytes]] = ..., commits: _Optional[_Iterable[bytes]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("key_fingerprint", "layout", "node_name", "software_version")
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    key_fingerprint: str
    layout: Layout
    node_name: str
    software_version: str
    def __init__(self, key_fingerprint: _Optional[str] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., node_name: _Optional[str] = ..., software_version: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_name", "settings", "latest_round", "latest_sum_round", "withdrawn_rounds")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    LATEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LATEST_SUM_ROUND_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    settings: FederationSettings
    latest_round: int
    latest_sum_round: int
    withdrawn_rounds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, node_name: _Optional[str] = ..., settings: _Optional[_Union[FederationSettings, _Mapping]] = ..., latest_round: _Optional[int] = ..., latest_sum_round: _Optional[int] = ..., withdrawn_rounds: _Optional[_Iterable[int]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("since_round",)
    SINCE_ROUND_FIELD_NUMBER: _ClassVar[int]
    since_round: int
    def __init__(self, since_round: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("kind", "round", "base_round", "reason", "deadline_unix", "expected", "participants", "replay", "time_unix", "min_participants", "nonce", "roster", "commits", "masked", "enrol_deadline_unix")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RoundEvent.Kind]
        OPENED: _ClassVar[RoundEvent.Kind]
        CLOSED: _ClassVar[RoundEvent.Kind]
        SUM_READY: _ClassVar[RoundEvent.Kind]
        FAILED: _ClassVar[RoundEvent.Kind]
        HEARTBEAT: _ClassVar[RoundEvent.Kind]
        WITHDRAWN: _ClassVar[RoundEvent.Kind]
        ROSTER: _ClassVar[RoundEvent.Kind]
        COMMITS: _ClassVar[RoundEvent.Kind]
    KIND_UNSPECIFIED: RoundEvent.Kind
    OPENED: RoundEvent.Kind
    CLOSED: RoundEvent.Kind
    SUM_READY: RoundEvent.Kind
    FAILED: RoundEvent.Kind
    HEARTBEAT: RoundEvent.Kind
    WITHDRAWN: RoundEvent.Kind
    ROSTER: RoundEvent.Kind
    COMMITS: RoundEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    ENROL_DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    kind: RoundEvent.Kind
    round: int
    base_round: int
    reason: str
    deadline_unix: float
    expected: int
    participants: int
    replay: bool
    time_unix: float
    min_participants: int
    nonce: bytes
    roster: _containers.RepeatedScalarFieldContainer[bytes]
    commits: _containers.RepeatedScalarFieldContainer[bytes]
    masked: bool
    enrol_deadline_unix: float
    def __init__(self, kind: _Optional[_Union[RoundEvent.Kind, str]] = ..., round: _Optional[int] = ..., base_round: _Optional[int] = ..., reason: _Optional[str] = ..., deadline_unix: _Optional[float] = ..., expected: _Optional[int] = ..., participants: _Optional[int] = ..., replay: _Optional[bool] = ..., time_unix: _Optional[float] = ..., min_participants: _Optional[int] = ..., nonce: _Optional[bytes] = ..., roster: _Optional[_Iterable[bytes]] = ..., commits: _Optional[_Iterable[bytes]] = ..., masked: _Optional[bool] = ..., enrol_deadline_unix: _Optional[float] = ...) -> None: ...

class SubmitHeader(_message.Message):
    __slots__ = ("round", "base_round", "submission_id", "layout_hash", "key_fingerprint", "num_values", "num_ciphertexts", "metrics", "roster_hash")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    NUM_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_HASH_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_round: int
    submission_id: str
    layout_hash: str
    key_fingerprint: str
    num_values: int
    num_ciphertexts: int
    metrics: _containers.ScalarMap[str, float]
    roster_hash: bytes
    def __init__(self, round: _Optional[int] = ..., base_round: _Optional[int] = ..., submission_id: _Optional[str] = ..., layout_hash: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., num_values: _Optional[int] = ..., num_ciphertexts: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., roster_hash: _Optional[bytes] = ...) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("index", "first_ciphertext", "ciphertexts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    first_ciphertext: int
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, index: _Optional[int] = ..., first_ciphertext: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    chunk: SubmitChunk
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., chunk: _Optional[_Union[SubmitChunk, _Mapping]] = ...) -> None: ...

class SubmitReceipt(_message.Message):
    __slots__ = ("round", "submission_id", "receipt", "duplicate", "num_ciphertexts", "num_bytes", "accepted_unix")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    NUM_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    round: int
    submission_id: str
    receipt: str
    duplicate: bool
    num_ciphertexts: int
    num_bytes: int
    accepted_unix: float
    def __init__(self, round: _Optional[int] = ..., submission_id: _Optional[str] = ..., receipt: _Optional[str] = ..., duplicate: _Optional[bool] = ..., num_ciphertexts: _Optional[int] = ..., num_bytes: _Optional[int] = ..., accepted_unix: _Optional[float] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("round", "first_ciphertext")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    round: int
    first_ciphertext: int
    def __init__(self, round: _Optional[int] = ..., first_ciphertext: _Optional[int] = ...) -> None: ...

class OutcomeReport(_message.Message):
    __slots__ = ("round", "applied", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    applied: bool
    reason: str
    def __init__(self, round: _Optional[int] = ..., applied: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class OutcomeAck(_message.Message):
    __slots__ = ("withdrawn",)
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    withdrawn: bool
    def __init__(self, withdrawn: _Optional[bool] = ...) -> None: ...

class AggregateChunk(_message.Message):
    __slots__ = ("round", "first_ciphertext", "ciphertexts", "num_ciphertexts", "num_values", "participants", "layout_hash", "seeds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    NUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    first_ciphertext: int
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    num_ciphertexts: int
    num_values: int
    participants: int
    layout_hash: str
    seeds: _containers.RepeatedCompositeFieldContainer[BlockSeeds]
    def __init__(self, round: _Optional[int] = ..., first_ciphertext: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ..., num_ciphertexts: _Optional[int] = ..., num_values: _Optional[int] = ..., participants: _Optional[int] = ..., layout_hash: _Optional[str] = ..., seeds: _Optional[_Iterable[_Union[BlockSeeds, _Mapping]]] = ...) -> None: ...

class BlockSeeds(_message.Message):
    __slots__ = ("seeds",)
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    seeds: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, seeds: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReadmitNodeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "started_unix", "settings", "nodes_known", "nodes_online", "open_round", "latest_round", "latest_sum_round", "rounds_failed", "auto_start", "max_rounds", "layout_hash", "layout_params", "rounds_withdrawn", "oldest_kept_round")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    NODES_KNOWN_FIELD_NUMBER: _ClassVar[int]
    NODES_ONLINE_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    LATEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LATEST_SUM_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FAILED_FIELD_NUMBER: _ClassVar[int]
    AUTO_START_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    OLDEST_KEPT_ROUND_FIELD_NUMBER: _ClassVar[int]
    version: str
    started_unix: float
    settings: FederationSettings
    nodes_known: int
    nodes_online: int
    open_round: int
    latest_round: int
    latest_sum_round: int
    rounds_failed: int
    auto_start: bool
    max_rounds: int
    layout_hash: str
    layout_params: int
    rounds_withdrawn: int
    oldest_kept_round: int
    def __init__(self, version: _Optional[str] = ..., started_unix: _Optional[float] = ..., settings: _Optional[_Union[FederationSettings, _Mapping]] = ..., nodes_known: _Optional[int] = ..., nodes_online: _Optional[int] = ..., open_round: _Optional[int] = ..., latest_round: _Optional[int] = ..., latest_sum_round: _Optional[int] = ..., rounds_failed: _Optional[int] = ..., auto_start: _Optional[bool] = ..., max_rounds: _Optional[int] = ..., layout_hash: _Optional[str] = ..., layout_params: _Optional[int] = ..., rounds_withdrawn: _Optional[int] = ..., oldest_kept_round: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "online", "first_seen_unix", "last_seen_unix", "last_round", "submissions", "missed_rounds", "expected", "offences", "last_offence_round", "last_offence_step", "last_offence_reason", "excluded_until_round", "revoked", "revoked_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    MISSED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    OFFENCES_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFENCE_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFENCE_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_OFFENCE_REASON_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_UNTIL_ROUND_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    online: bool
    first_seen_unix: float
    last_seen_unix: float
    last_round: int
    submissions: int
    missed_rounds: int
    expected: bool
    offences: int
    last_offence_round: int
    last_offence_step: str
    last_offence_reason: str
    excluded_until_round: int
    revoked: bool
    revoked_reason: str
    def __init__(self, name: _Optional[str] = ..., online: _Optional[bool] = ..., first_seen_unix: _Optional[float] = ..., last_seen_unix: _Optional[float] = ..., last_round: _Optional[int] = ..., submissions: _Optional[int] = ..., missed_rounds: _Optional[int] = ..., expected: _Optional[bool] = ..., offences: _Optional[int] = ..., last_offence_round: _Optional[int] = ..., last_offence_step: _Optional[str] = ..., last_offence_reason: _Optional[str] = ..., excluded_until_round: _Optional[int] = ..., revoked: _Optional[bool] = ..., revoked_reason: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class SubmissionInfo(_message.Message):
    __slots__ = ("node_name", "accepted_unix", "num_bytes", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    accepted_unix: float
    num_bytes: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, node_name: _Optional[str] = ..., accepted_unix: _Optional[float] = ..., num_bytes: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class NodeOutcome(_message.Message):
    __slots__ = ("node_name", "applied", "reason", "reported_unix")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPORTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    applied: bool
    reason: str
    reported_unix: float
    def __init__(self, node_name: _Optional[str] = ..., applied: _Optional[bool] = ..., reason: _Optional[str] = ..., reported_unix: _Optional[float] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "base_round", "opened_unix", "deadline_unix", "closed_unix", "expected", "participants", "reason", "submissions", "min_participants", "outcomes", "withdrawn_reason", "withdrawn_unix", "phase", "enrolled", "committed", "released", "failed_step", "culprits", "reformed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    CLOSED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_REASON_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_UNIX_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    FAILED_STEP_FIELD_NUMBER: _ClassVar[int]
    CULPRITS_FIELD_NUMBER: _ClassVar[int]
    REFORMED_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: RoundState
    base_round: int
    opened_unix: float
    deadline_unix: float
    closed_unix: float
    expected: int
    participants: int
    reason: str
    submissions: _containers.RepeatedCompositeFieldContainer[SubmissionInfo]
    min_participants: int
    outcomes: _containers.RepeatedCompositeFieldContainer[NodeOutcome]
    withdrawn_reason: str
    withdrawn_unix: float
    phase: str
    enrolled: int
    committed: int
    released: int
    failed_step: str
    culprits: _containers.RepeatedScalarFieldContainer[str]
    reformed: bool
    def __init__(self, round: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., base_round: _Optional[int] = ..., opened_unix: _Optional[float] = ..., deadline_unix: _Optional[float] = ..., closed_unix: _Optional[float] = ..., expected: _Optional[int] = ..., participants: _Optional[int] = ..., reason: _Optional[str] = ..., submissions: _Optional[_Iterable[_Union[SubmissionInfo, _Mapping]]] = ..., min_participants: _Optional[int] = ..., outcomes: _Optional[_Iterable[_Union[NodeOutcome, _Mapping]]] = ..., withdrawn_reason: _Optional[str] = ..., withdrawn_unix: _Optional[float] = ..., phase: _Optional[str] = ..., enrolled: _Optional[int] = ..., committed: _Optional[int] = ..., released: _Optional[int] = ..., failed_step: _Optional[str] = ..., culprits: _Optional[_Iterable[str]] = ..., reformed: _Optional[bool] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("limit", "before_round")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ROUND_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before_round: int
    def __init__(self, limit: _Optional[int] = ..., before_round: _Optional[int] = ...) -> None: ...

class ListRoundsReply(_message.Message):
    __slots__ = ("rounds", "next_before_round")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_BEFORE_ROUND_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    next_before_round: int
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ..., next_before_round: _Optional[int] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class StartRoundRequest(_message.Message):
    __slots__ = ("timeout_seconds", "force")
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    force: bool
    def __init__(self, timeout_seconds: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class CloseRoundRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class WithdrawRoundRequest(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SetLayoutRequest(_message.Message):
    __slots__ = ("layout", "replace")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    layout: Layout
    replace: bool
    def __init__(self, layout: _Optional[_Union[Layout, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class ResetLayoutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayoutReply(_message.Message):
    __slots__ = ("layout_hash", "num_params", "num_tensors")
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    layout_hash: str
    num_params: int
    num_tensors: int
    def __init__(self, layout_hash: _Optional[str] = ..., num_params: _Optional[int] = ..., num_tensors: _Optional[int] = ...) -> None: ...
