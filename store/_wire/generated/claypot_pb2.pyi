from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD: _ClassVar[CallKind]
    GET_ATTR: _ClassVar[CallKind]
    SET_ATTR: _ClassVar[CallKind]
    DEL_ATTR: _ClassVar[CallKind]
    TASK: _ClassVar[CallKind]

class ByteOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BYTE_ORDER_UNSPECIFIED: _ClassVar[ByteOrder]
    BYTE_ORDER_LITTLE_ENDIAN: _ClassVar[ByteOrder]
    BYTE_ORDER_BIG_ENDIAN: _ClassVar[ByteOrder]
METHOD: CallKind
GET_ATTR: CallKind
SET_ATTR: CallKind
DEL_ATTR: CallKind
TASK: CallKind
BYTE_ORDER_UNSPECIFIED: ByteOrder
BYTE_ORDER_LITTLE_ENDIAN: ByteOrder
BYTE_ORDER_BIG_ENDIAN: ByteOrder

class AddReplicaRequest(_message.Message):
    __slots__ = ("object_id", "backend_id")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    backend_id: str
    def __init__(self, object_id: _Optional[str] = ..., backend_id: _Optional[str] = ...) -> None: ...

class AddReplicaResponse(_message.Message):
    __slots__ = ("error", "backend_id")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    error: Error
    backend_id: str
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., backend_id: _Optional[str] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("object_id", "primary_id", "epoch", "lsn", "class_key", "alias", "state", "deleted", "calls")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LSN_FIELD_NUMBER: _ClassVar[int]
    CLASS_KEY_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    primary_id: str
    epoch: int
    lsn: int
    class_key: str
    alias: str
    state: Value
    deleted: bool
    calls: _containers.RepeatedCompositeFieldContainer[ReplicatedCall]
    def __init__(self, object_id: _Optional[str] = ..., primary_id: _Optional[str] = ..., epoch: _Optional[int] = ..., lsn: _Optional[int] = ..., class_key: _Optional[str] = ..., alias: _Optional[str] = ..., state: _Optional[_Union[Value, _Mapping]] = ..., deleted: _Optional[bool] = ..., calls: _Optional[_Iterable[_Union[ReplicatedCall, _Mapping]]] = ...) -> None: ...

class ReplicatedCall(_message.Message):
    __slots__ = ("call_id", "result")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    result: Value
    def __init__(self, call_id: _Optional[str] = ..., result: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("error", "epoch")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    error: Error
    epoch: int
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class UpgradeClassRequest(_message.Message):
    __slots__ = ("object_id", "class_key", "chain_id")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_KEY_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    class_key: str
    chain_id: str
    def __init__(self, object_id: _Optional[str] = ..., class_key: _Optional[str] = ..., chain_id: _Optional[str] = ...) -> None: ...

class UpgradeClassResponse(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("call_id",)
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    def __init__(self, call_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "remote_type", "traceback", "pickled", "moved_to")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    PICKLED_FIELD_NUMBER: _ClassVar[int]
    MOVED_TO_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    remote_type: str
    traceback: str
    pickled: bytes
    moved_to: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., remote_type: _Optional[str] = ..., traceback: _Optional[str] = ..., pickled: _Optional[bytes] = ..., moved_to: _Optional[str] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("error",)
    ERROR_FIELD_NUMBER: _ClassVar[int]
    error: Error
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("payload", "buffers", "buffer_sizes", "shm", "shm_offsets", "leases")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    buffers: _containers.RepeatedScalarFieldContainer[bytes]
    buffer_sizes: _containers.RepeatedScalarFieldContainer[int]
    shm: _containers.RepeatedScalarFieldContainer[str]
    shm_offsets: _containers.RepeatedScalarFieldContainer[int]
    leases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, payload: _Optional[bytes] = ..., buffers: _Optional[_Iterable[bytes]] = ..., buffer_sizes: _Optional[_Iterable[int]] = ..., shm: _Optional[_Iterable[str]] = ..., shm_offsets: _Optional[_Iterable[int]] = ..., leases: _Optional[_Iterable[str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    data: bytes
    def __init__(self, header: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("backend_id", "address", "host", "pid", "status", "host_id")
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    backend_id: str
    address: str
    host: str
    pid: int
    status: str
    host_id: str
    def __init__(self, backend_id: _Optional[str] = ..., address: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., status: _Optional[str] = ..., host_id: _Optional[str] = ...) -> None: ...

class ObjectRef(_message.Message):
    __slots__ = ("object_id", "class_key", "backend_id", "aliases", "replicas", "epoch")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_KEY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    class_key: str
    backend_id: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    replicas: _containers.RepeatedScalarFieldContainer[str]
    epoch: int
    def __init__(self, object_id: _Optional[str] = ..., class_key: _Optional[str] = ..., backend_id: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., replicas: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("object_id", "alias")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    alias: str
    def __init__(self, object_id: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class ResolveReply(_message.Message):
    __slots__ = ("ref", "error")
    REF_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ref: ObjectRef
    error: Error
    def __init__(self, ref: _Optional[_Union[ObjectRef, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class BackendInfo(_message.Message):
    __slots__ = ("backend_id", "address", "host", "pid", "up", "objects", "memory_bytes", "resident_objects", "running_tasks", "host_id", "stopped", "metrics_address", "resources_json")
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TASKS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_JSON_FIELD_NUMBER: _ClassVar[int]
    backend_id: str
    address: str
    host: str
    pid: int
    up: bool
    objects: int
    memory_bytes: int
    resident_objects: int
    running_tasks: int
    host_id: str
    stopped: bool
    metrics_address: str
    resources_json: str
    def __init__(self, backend_id: _Optional[str] = ..., address: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., up: _Optional[bool] = ..., objects: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., resident_objects: _Optional[int] = ..., running_tasks: _Optional[int] = ..., host_id: _Optional[str] = ..., stopped: _Optional[bool] = ..., metrics_address: _Optional[str] = ..., resources_json: _Optional[str] = ...) -> None: ...

class ListBackendsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackendsReply(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendInfo]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendInfo, _Mapping]]] = ...) -> None: ...

class RegisterCodeRequest(_message.Message):
    __slots__ = ("key", "code")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    key: str
    code: bytes
    def __init__(self, key: _Optional[str] = ..., code: _Optional[bytes] = ...) -> None: ...

class GetCodeRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class GetCodeReply(_message.Message):
    __slots__ = ("code", "error")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    code: bytes
    error: Error
    def __init__(self, code: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class AliasRequest(_message.Message):
    __slots__ = ("alias", "object_id")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    alias: str
    object_id: str
    def __init__(self, alias: _Optional[str] = ..., object_id: _Optional[str] = ...) -> None: ...

class PersistObject(_message.Message):
    __slots__ = ("object_id", "class_key", "state", "alias")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    class_key: str
    state: Value
    alias: str
    def __init__(self, object_id: _Optional[str] = ..., class_key: _Optional[str] = ..., state: _Optional[_Union[Value, _Mapping]] = ..., alias: _Optional[str] = ...) -> None: ...

class PersistRequest(_message.Message):
    __slots__ = ("objects", "adopt", "replicas")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[PersistObject]
    adopt: bool
    replicas: int
    def __init__(self, objects: _Optional[_Iterable[_Union[PersistObject, _Mapping]]] = ..., adopt: _Optional[bool] = ..., replicas: _Optional[int] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("object_id", "kind", "name", "args", "chain_id", "call_id", "mutates", "timeout", "accept_shm", "reader_pid", "reader_pid_ns", "on_replica")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    MUTATES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_SHM_FIELD_NUMBER: _ClassVar[int]
    READER_PID_FIELD_NUMBER: _ClassVar[int]
    READER_PID_NS_FIELD_NUMBER: _ClassVar[int]
    ON_REPLICA_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    kind: CallKind
    name: str
    args: Value
    chain_id: str
    call_id: str
    mutates: _containers.RepeatedScalarFieldContainer[str]
    timeout: float
    accept_shm: bool
    reader_pid: int
    reader_pid_ns: int
    on_replica: bool
    def __init__(self, object_id: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., name: _Optional[str] = ..., args: _Optional[_Union[Value, _Mapping]] = ..., chain_id: _Optional[str] = ..., call_id: _Optional[str] = ..., mutates: _Optional[_Iterable[str]] = ..., timeout: _Optional[float] = ..., accept_shm: _Optional[bool] = ..., reader_pid: _Optional[int] = ..., reader_pid_ns: _Optional[int] = ..., on_replica: _Optional[bool] = ...) -> None: ...

class CallReply(_message.Message):
    __slots__ = ("result", "error", "result_handle", "result_size", "version_table", "version_slot", "version_word", "version_pid")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    RESULT_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_TABLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_SLOT_FIELD_NUMBER: _ClassVar[int]
    VERSION_WORD_FIELD_NUMBER: _ClassVar[int]
    VERSION_PID_FIELD_NUMBER: _ClassVar[int]
    result: Value
    error: Error
    result_handle: str
    result_size: int
    version_table: str
    version_slot: int
    version_word: int
    version_pid: int
    def __init__(self, result: _Optional[_Union[Value, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., result_handle: _Optional[str] = ..., result_size: _Optional[int] = ..., version_table: _Optional[str] = ..., version_slot: _Optional[int] = ..., version_word: _Optional[int] = ..., version_pid: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("result_handle",)
    RESULT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    result_handle: str
    def __init__(self, result_handle: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("object_id", "chain_id")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    chain_id: str
    def __init__(self, object_id: _Optional[str] = ..., chain_id: _Optional[str] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("object_id", "target_backend_id", "chain_id")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    target_backend_id: str
    chain_id: str
    def __init__(self, object_id: _Optional[str] = ..., target_backend_id: _Optional[str] = ..., chain_id: _Optional[str] = ...) -> None: ...

class JsonCallRequest(_message.Message):
    __slots__ = ("object_id", "alias", "kind", "name", "args_json", "kwargs_json")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    alias: str
    kind: CallKind
    name: str
    args_json: str
    kwargs_json: str
    def __init__(self, object_id: _Optional[str] = ..., alias: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., name: _Optional[str] = ..., args_json: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class JsonCallReply(_message.Message):
    __slots__ = ("result_json", "error")
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result_json: str
    error: Error
    def __init__(self, result_json: _Optional[str] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class TypedArray(_message.Message):
    __slots__ = ("dtype", "shape", "byte_order", "nbytes", "data", "chunked")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_ORDER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_order: ByteOrder
    nbytes: int
    data: bytes
    chunked: bool
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_order: _Optional[_Union[ByteOrder, str]] = ..., nbytes: _Optional[int] = ..., data: _Optional[bytes] = ..., chunked: _Optional[bool] = ...) -> None: ...

class GetArrayRequest(_message.Message):
    __slots__ = ("object_id", "alias", "kind", "name", "args_json", "kwargs_json")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    alias: str
    kind: CallKind
    name: str
    args_json: str
    kwargs_json: str
    def __init__(self, object_id: _Optional[str] = ..., alias: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., name: _Optional[str] = ..., args_json: _Optional[str] = ..., kwargs_json: _Optional[str] = ...) -> None: ...

class GetArrayResponse(_message.Message):
    __slots__ = ("array", "data")
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    array: TypedArray
    data: bytes
    def __init__(self, array: _Optional[_Union[TypedArray, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetArrayHeader(_message.Message):
    __slots__ = ("object_id", "alias", "name", "array")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    alias: str
    name: str
    array: TypedArray
    def __init__(self, object_id: _Optional[str] = ..., alias: _Optional[str] = ..., name: _Optional[str] = ..., array: _Optional[_Union[TypedArray, _Mapping]] = ...) -> None: ...

class SetArrayRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SetArrayHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SetArrayHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetArrayResponse(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: ObjectRef
    def __init__(self, ref: _Optional[_Union[ObjectRef, _Mapping]] = ...) -> None: ...

class CreateObjectRequest(_message.Message):
    __slots__ = ("class_name", "args_json", "kwargs_json", "alias", "backend_id")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    KWARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_ID_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    args_json: str
    kwargs_json: str
    alias: str
    backend_id: str
    def __init__(self, class_name: _Optional[str] = ..., args_json: _Optional[str] = ..., kwargs_json: _Optional[str] = ..., alias: _Optional[str] = ..., backend_id: _Optional[str] = ...) -> None: ...

class CreateObjectResponse(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: ObjectRef
    def __init__(self, ref: _Optional[_Union[ObjectRef, _Mapping]] = ...) -> None: ...

class DeleteObjectRequest(_message.Message):
    __slots__ = ("object_id", "alias")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    alias: str
    def __init__(self, object_id: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class DeleteObjectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeasesRequest(_message.Message):
    __slots__ = ("release",)
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    release: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, release: _Optional[_Iterable[str]] = ...) -> None: ...

class LeasesResponse(_message.Message):
    __slots__ = ("leased_bytes", "leases", "segment_bytes", "segments", "limit", "stale_leased_bytes", "error", "relocations", "pool_bytes", "pool_segments")
    LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STALE_LEASED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RELOCATIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    leased_bytes: int
    leases: int
    segment_bytes: int
    segments: int
    limit: int
    stale_leased_bytes: int
    error: Error
    relocations: int
    pool_bytes: int
    pool_segments: int
    def __init__(self, leased_bytes: _Optional[int] = ..., leases: _Optional[int] = ..., segment_bytes: _Optional[int] = ..., segments: _Optional[int] = ..., limit: _Optional[int] = ..., stale_leased_bytes: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., relocations: _Optional[int] = ..., pool_bytes: _Optional[int] = ..., pool_segments: _Optional[int] = ...) -> None: ...
