// claypot C++ client: see include/claypot/client.hpp.
#include "claypot/client.hpp"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <utility>

#include "claypot.grpc.pb.h"

namespace claypot {
namespace {

namespace pb = ::claypot::v1;

constexpr const char* kTokenHeader = "claypot-token";
constexpr const char* kErrorCodeHeader = "claypot-error-code";
constexpr const char* kRemoteTypeHeader = "claypot-remote-type";
// The backend's defaults: arrays up to 1 MiB travel inline, larger ones in 4 MiB chunks.
constexpr std::size_t kInlineLimit = 1024 * 1024;
constexpr std::size_t kChunkBytes = 4 * 1024 * 1024;
// A transfer's deadline grows by one second per this many bytes.
constexpr double kStreamMinRate = 50.0 * 1024 * 1024;

// dtype name -> (element size, byte-swap lane: complex swaps each half).
const std::map<std::string, std::pair<std::size_t, std::size_t>>& dtypes() {
  static const std::map<std::string, std::pair<std::size_t, std::size_t>> table = {
      {"bool", {1, 1}},    {"int8", {1, 1}},      {"uint8", {1, 1}},
      {"int16", {2, 2}},   {"uint16", {2, 2}},    {"int32", {4, 4}},
      {"uint32", {4, 4}},  {"int64", {8, 8}},     {"uint64", {8, 8}},
      {"float16", {2, 2}}, {"float32", {4, 4}},   {"float64", {8, 8}},
      {"complex64", {8, 4}}, {"complex128", {16, 8}},
  };
  return table;
}

bool little_endian() {
  const uint16_t probe = 1;
  unsigned char first;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

pb::ByteOrder native_order() {
  return little_endian() ? pb::BYTE_ORDER_LITTLE_ENDIAN : pb::BYTE_ORDER_BIG_ENDIAN;
}

void swap_lanes(unsigned char* data, std::size_t nbytes, std::size_t lane) {
  for (std::size_t i = 0; i + lane <= nbytes; i += lane) std::reverse(data + i, data + i + lane);
}

// The claypot error code of a gRPC status without a claypot-error-code trailer.
std::string code_of_status(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAUTHENTICATED: return "AuthenticationError";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DeadlineExceeded";
    case grpc::StatusCode::UNAVAILABLE: return "BackendUnavailable";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "ValueTooLarge";
    case grpc::StatusCode::INVALID_ARGUMENT: return "ProtocolError";
    default: return "ClaypotError";
  }
}

std::string trailer(const grpc::ClientContext& ctx, const char* key) {
  const auto& md = ctx.GetServerTrailingMetadata();
  auto it = md.find(key);
  return it == md.end() ? "" : std::string(it->second.data(), it->second.size());
}

Error status_error(const grpc::ClientContext& ctx, const grpc::Status& status) {
  std::string code = trailer(ctx, kErrorCodeHeader);
  if (code.empty()) code = code_of_status(status.error_code());
  std::string message = status.error_message();
  const std::string prefix = code + ": ";
  if (message.rfind(prefix, 0) == 0) message = message.substr(prefix.size());
  return Error(code, message, static_cast<int>(status.error_code()),
               trailer(ctx, kRemoteTypeHeader));
}

// The gRPC status of each error code (README, "Errors, in every language"),
// for errors that arrive inside a reply rather than as a call's status.
grpc::StatusCode status_of_code(const std::string& code) {
  static const std::map<std::string, grpc::StatusCode> table = {
      {"ConfigurationError", grpc::StatusCode::INVALID_ARGUMENT},
      {"AuthenticationError", grpc::StatusCode::UNAUTHENTICATED},
      {"ProtocolError", grpc::StatusCode::INVALID_ARGUMENT},
      {"SerializationError", grpc::StatusCode::INVALID_ARGUMENT},
      {"ClassNotFound", grpc::StatusCode::FAILED_PRECONDITION},
      {"ValueTooLarge", grpc::StatusCode::RESOURCE_EXHAUSTED},
      {"ObjectError", grpc::StatusCode::FAILED_PRECONDITION},
      {"ObjectNotFound", grpc::StatusCode::NOT_FOUND},
      {"ObjectMoved", grpc::StatusCode::NOT_FOUND},
      {"AliasNotFound", grpc::StatusCode::NOT_FOUND},
      {"AliasExists", grpc::StatusCode::ALREADY_EXISTS},
      {"NotPersistent", grpc::StatusCode::FAILED_PRECONDITION},
      {"AlreadyPersistent", grpc::StatusCode::ALREADY_EXISTS},
      {"ObjectCorrupt", grpc::StatusCode::DATA_LOSS},
      {"ObjectBusy", grpc::StatusCode::FAILED_PRECONDITION},
      {"InvalidKey", grpc::StatusCode::INVALID_ARGUMENT},
      {"NotAVersion", grpc::StatusCode::FAILED_PRECONDITION},
      {"FeatureUnavailable", grpc::StatusCode::UNIMPLEMENTED},
      {"BackendError", grpc::StatusCode::UNAVAILABLE},
      {"BackendNotFound", grpc::StatusCode::NOT_FOUND},
      {"BackendUnavailable", grpc::StatusCode::UNAVAILABLE},
      {"BackendDown", grpc::StatusCode::UNAVAILABLE},
      {"CallInterrupted", grpc::StatusCode::ABORTED},
      {"StorageFailed", grpc::StatusCode::INTERNAL},
      {"DeadlineExceeded", grpc::StatusCode::DEADLINE_EXCEEDED},
      {"TaskError", grpc::StatusCode::ABORTED},
      {"TaskCancelled", grpc::StatusCode::CANCELLED},
      {"TaskTimeout", grpc::StatusCode::DEADLINE_EXCEEDED},
      {"CallCancelled", grpc::StatusCode::CANCELLED},
      {"RemoteError", grpc::StatusCode::UNKNOWN},
  };
  auto it = table.find(code);
  return it == table.end() ? grpc::StatusCode::INTERNAL : it->second;
}

Error reply_error(const pb::Error& err) {
  return Error(err.code(), err.message(), static_cast<int>(status_of_code(err.code())),
               err.remote_type());
}

template <class Request>
void set_target(Request* request, const Target& target) {
  if (!target.object_id().empty()) {
    request->set_object_id(target.object_id());
  } else if (!target.alias().empty()) {
    request->set_alias(target.alias());
  } else {
    throw Error("ConfigurationError", "a target needs an alias or an object id",
                static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  }
}

ObjectRef ref_of(const pb::ObjectRef& ref) {
  return ObjectRef{ref.object_id(), ref.class_key(), ref.backend_id()};
}

}  // namespace

uint64_t Array::size() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

std::size_t Array::itemsize() const {
  auto it = dtypes().find(dtype);
  return it == dtypes().end() ? 0 : it->second.first;
}

void Array::check_type(const std::type_info& type, std::size_t size) const {
  static const std::map<std::string, const std::type_info*> types = {
      {"bool", &typeid(uint8_t)},   {"int8", &typeid(int8_t)},     {"uint8", &typeid(uint8_t)},
      {"int16", &typeid(int16_t)},  {"uint16", &typeid(uint16_t)}, {"int32", &typeid(int32_t)},
      {"uint32", &typeid(uint32_t)}, {"int64", &typeid(int64_t)},  {"uint64", &typeid(uint64_t)},
      {"float16", &typeid(uint16_t)}, {"float32", &typeid(float)}, {"float64", &typeid(double)},
      {"complex64", &typeid(float)}, {"complex128", &typeid(double)},
  };
  auto it = types.find(dtype);
  if (it == types.end() || *it->second != type || (size != itemsize() &&
                                                   dtype.rfind("complex", 0) != 0)) {
    throw Error("ProtocolError", "array of dtype " + dtype + " read as " + type.name(),
                static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  }
}

struct Client::Impl {
  Options options;
  std::string address;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  grpc::ChannelArguments args;
  std::unique_ptr<pb::Backend::Stub> stub;
  // Direct mode's routes: alias -> owner id, owner id -> address, address ->
  // stub (null: the address does not answer from here).
  std::mutex routes_lock;
  std::map<std::string, std::string> owners;
  std::map<std::string, std::string> addresses;
  std::map<std::string, std::unique_ptr<pb::Backend::Stub>> owner_stubs;

  void prepare(grpc::ClientContext* ctx, double seconds) const {
    if (!options.token.empty()) ctx->AddMetadata(kTokenHeader, options.token);
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
  }

  template <class Request, class Reply>
  Reply unary(grpc::Status (pb::Backend::Stub::*method)(grpc::ClientContext*, const Request&,
                                                         Reply*),
              const Request& request, double seconds) {
    grpc::ClientContext ctx;
    prepare(&ctx, seconds);
    Reply reply;
    grpc::Status status = (stub.get()->*method)(&ctx, request, &reply);
    if (!status.ok()) throw status_error(ctx, status);
    return reply;
  }

  std::string json(const Target& target, pb::CallKind kind, const std::string& name,
                   const std::string& args, const std::string& kwargs) {
    pb::JsonCallRequest request;
    set_target(&request, target);
    request.set_kind(kind);
    request.set_name(name);
    request.set_args_json(args);
    request.set_kwargs_json(kwargs);
    auto reply = unary(&pb::Backend::Stub::CallJson, request, options.call_timeout);
    if (reply.has_error() && !reply.error().code().empty()) throw reply_error(reply.error());
    return reply.result_json().empty() ? "null" : reply.result_json();
  }

  // Runs GetArray; `place(header)` returns where the data goes (nbytes long).
  Array get_array(pb::Backend::Stub* via, const pb::GetArrayRequest& request,
                  const std::function<unsigned char*(Array&, uint64_t)>& place) {
    grpc::ClientContext ctx;
    prepare(&ctx, options.call_timeout);
    auto reader = via->GetArray(&ctx, request);
    pb::GetArrayResponse message;
    Array array;
    bool have_header = false;
    pb::ByteOrder order = pb::BYTE_ORDER_LITTLE_ENDIAN;
    unsigned char* out = nullptr;
    uint64_t nbytes = 0, received = 0;
    std::string failure;
    while (failure.empty() && reader->Read(&message)) {
      if (message.has_array()) {
        if (have_header) { failure = "a second array header"; break; }
        have_header = true;
        const pb::TypedArray& h = message.array();
        array.dtype = h.dtype();
        array.shape.assign(h.shape().begin(), h.shape().end());
        if (array.itemsize() == 0) { failure = "unknown dtype " + h.dtype(); break; }
        nbytes = h.nbytes();
        if (nbytes != array.size() * array.itemsize()) { failure = "nbytes mismatch"; break; }
        order = h.byte_order() == pb::BYTE_ORDER_BIG_ENDIAN ? pb::BYTE_ORDER_BIG_ENDIAN
                                                           : pb::BYTE_ORDER_LITTLE_ENDIAN;
        try {
          out = place(array, nbytes);
        } catch (...) {
          ctx.TryCancel();
          reader->Finish();
          throw;
        }
        if (!h.chunked()) {
          if (h.data().size() != nbytes) { failure = "inline data size mismatch"; break; }
          if (nbytes) std::memcpy(out, h.data().data(), nbytes);
          received = nbytes;
        }
      } else {
        const std::string& data = message.data();
        if (!have_header || received + data.size() > nbytes) {
          failure = "array data without a header, or more than announced";
          break;
        }
        std::memcpy(out + received, data.data(), data.size());
        received += data.size();
      }
    }
    if (!failure.empty()) ctx.TryCancel();
    grpc::Status status = reader->Finish();
    if (!failure.empty()) {
      throw Error("ProtocolError", failure, static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
    }
    if (!status.ok()) throw status_error(ctx, status);
    if (!have_header || received != nbytes) {
      throw Error("ProtocolError", "GetArray ended before all data arrived",
                  static_cast<int>(grpc::StatusCode::DATA_LOSS));
    }
    const std::size_t lane = dtypes().at(array.dtype).second;
    if (lane > 1 && order != native_order()) swap_lanes(out, nbytes, lane);
    return array;
  }

  std::pair<std::string, std::string> locate(const Target& target) {
    std::string backend = target.backend_id();
    if (backend.empty()) {
      {
        std::lock_guard<std::mutex> hold(routes_lock);
        auto it = owners.find(target.alias());
        if (!target.alias().empty() && it != owners.end()) backend = it->second;
      }
      if (backend.empty()) {
        pb::ResolveRequest request;
        if (!target.object_id().empty()) {
          request.set_object_id(target.object_id());
        } else {
          request.set_alias(target.alias());
        }
        auto reply = unary(&pb::Backend::Stub::Resolve, request, options.timeout);
        if (reply.has_error() && !reply.error().code().empty()) throw reply_error(reply.error());
        backend = reply.ref().backend_id();
        std::lock_guard<std::mutex> hold(routes_lock);
        if (!target.alias().empty()) owners[target.alias()] = backend;
      }
    }
    {
      std::lock_guard<std::mutex> hold(routes_lock);
      auto it = addresses.find(backend);
      if (it != addresses.end()) return {backend, it->second};
    }
    auto reply = unary(&pb::Backend::Stub::ListBackends, pb::ListBackendsRequest(),
                       options.timeout);
    std::lock_guard<std::mutex> hold(routes_lock);
    for (const auto& b : reply.backends()) addresses[b.backend_id()] = b.address();
    return {backend, addresses[backend]};
  }

  // The owner's stub in direct mode, or null (use the backend connected to).
  pb::Backend::Stub* owner_stub(const Target& target) {
    if (!options.direct) return nullptr;
    std::string where;
    try {
      where = locate(target).second;
    } catch (const Error&) {
      return nullptr;  // the gateway answers the same error, with its status
    }
    if (where.empty() || where == address) return nullptr;
    {
      std::lock_guard<std::mutex> hold(routes_lock);
      auto it = owner_stubs.find(where);
      if (it != owner_stubs.end()) return it->second.get();
    }
    // Connect within the directory timeout: an address that does not answer
    // here (NAT, a container's name) must not hold a call for its deadline.
    auto channel = grpc::CreateCustomChannel(where, creds, args);
    const auto deadline = std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(options.timeout * 1000));
    // Ready, or given up at the first failure to connect (WaitForConnected
    // would keep retrying a refused address until the deadline).
    bool up = false;
    for (;;) {
      const grpc_connectivity_state state = channel->GetState(true);
      if (state == GRPC_CHANNEL_READY) { up = true; break; }
      if (state == GRPC_CHANNEL_TRANSIENT_FAILURE || state == GRPC_CHANNEL_SHUTDOWN) break;
      if (!channel->WaitForStateChange(state, deadline)) break;
    }
    std::lock_guard<std::mutex> hold(routes_lock);
    auto& slot = owner_stubs[where];
    if (up && !slot) slot = pb::Backend::NewStub(channel);
    return slot.get();
  }

  // Run on the owner (direct mode), else or then on the backend connected to:
  // again there when the owner did not run it (NOT_FOUND: the route is stale;
  // UNAVAILABLE, for operations safe to repeat).
  template <class Result>
  Result routed(const Target& target, bool repeatable,
                const std::function<Result(pb::Backend::Stub*)>& run) {
    if (pb::Backend::Stub* owner = owner_stub(target)) {
      try {
        return run(owner);
      } catch (const Error& err) {
        const int status = err.grpc_status();
        const bool stale = status == static_cast<int>(grpc::StatusCode::NOT_FOUND) ||
                           (repeatable && status == static_cast<int>(grpc::StatusCode::UNAVAILABLE));
        if (!stale) throw;
        std::lock_guard<std::mutex> hold(routes_lock);
        owners.erase(target.alias());
        addresses.clear();
      }
    }
    return run(stub.get());
  }
};

Client::Client(const std::string& address, Options options) : impl_(new Impl) {
  impl_->options = std::move(options);
  impl_->address = address;
  if (impl_->options.ca_pem.empty()) {
    impl_->creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = impl_->options.ca_pem;
    impl_->creds = grpc::SslCredentials(ssl);
  }
  impl_->args.SetMaxReceiveMessageSize(64 * 1024 * 1024);
  impl_->args.SetMaxSendMessageSize(64 * 1024 * 1024);
  impl_->stub = pb::Backend::NewStub(
      grpc::CreateCustomChannel(address, impl_->creds, impl_->args));
  backend_id();  // fails fast (BackendUnavailable) when nothing answers
}

Client::~Client() = default;

std::string Client::backend_id() {
  return impl_->unary(&pb::Backend::Stub::Ping, pb::PingRequest(), impl_->options.timeout)
      .backend_id();
}

ObjectRef Client::get_by_alias(const std::string& alias) {
  pb::ResolveRequest request;
  request.set_alias(alias);
  auto reply = impl_->unary(&pb::Backend::Stub::Resolve, request, impl_->options.timeout);
  if (reply.has_error() && !reply.error().code().empty()) throw reply_error(reply.error());
  return ref_of(reply.ref());
}

std::string Client::call(const Target& target, const std::string& method,
                         const std::string& args_json, const std::string& kwargs_json) {
  return impl_->json(target, pb::METHOD, method, args_json, kwargs_json);
}

std::string Client::get(const Target& target, const std::string& name) {
  return impl_->json(target, pb::GET_ATTR, name, "", "");
}

void Client::set(const Target& target, const std::string& name, const std::string& value_json) {
  impl_->json(target, pb::SET_ATTR, name, value_json, "");
}

Array Client::get_array(const Target& target, const std::string& name) {
  pb::GetArrayRequest request;
  set_target(&request, target);
  request.set_kind(pb::GET_ATTR);
  request.set_name(name);
  return impl_->routed<Array>(target, true, [&](pb::Backend::Stub* via) {
    return impl_->get_array(via, request, [](Array& a, uint64_t n) {
      a.data.resize(n);
      return a.data.data();
    });
  });
}

Array Client::call_array(const Target& target, const std::string& method,
                         const std::string& args_json, const std::string& kwargs_json) {
  pb::GetArrayRequest request;
  set_target(&request, target);
  request.set_kind(pb::METHOD);
  request.set_name(method);
  request.set_args_json(args_json);
  request.set_kwargs_json(kwargs_json);
  return impl_->routed<Array>(target, false, [&](pb::Backend::Stub* via) {
    return impl_->get_array(via, request, [](Array& a, uint64_t n) {
      a.data.resize(n);
      return a.data.data();
    });
  });
}

Array Client::read_array_into(const Target& target, const std::string& name, void* buffer,
                              std::size_t capacity) {
  pb::GetArrayRequest request;
  set_target(&request, target);
  request.set_kind(pb::GET_ATTR);
  request.set_name(name);
  return impl_->routed<Array>(target, true, [&](pb::Backend::Stub* via) {
    return impl_->get_array(via, request, [buffer, capacity](Array&, uint64_t n) {
      if (n > capacity) {
        throw Error("ValueTooLarge",
                    "array of " + std::to_string(n) + " bytes does not fit a buffer of " +
                        std::to_string(capacity),
                    static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
      }
      return static_cast<unsigned char*>(buffer);
    });
  });
}

void Client::set_array(const Target& target, const std::string& name, const std::string& dtype,
                       const std::vector<uint64_t>& shape, const void* data,
                       std::size_t nbytes) {
  auto it = dtypes().find(dtype);
  if (it == dtypes().end()) {
    throw Error("ProtocolError", "unknown dtype " + dtype,
                static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  }
  uint64_t count = 1;
  for (uint64_t d : shape) count *= d;
  if (count * it->second.first != nbytes) {
    throw Error("ProtocolError", "nbytes does not match dtype and shape",
                static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  }
  const bool chunked = nbytes > kInlineLimit;
  pb::SetArrayRequest first;
  pb::SetArrayHeader* header = first.mutable_header();
  set_target(header, target);
  header->set_name(name);
  pb::TypedArray* array = header->mutable_array();
  array->set_dtype(dtype);
  for (uint64_t d : shape) array->add_shape(d);
  array->set_byte_order(native_order());
  array->set_nbytes(nbytes);
  array->set_chunked(chunked);
  const auto* bytes = static_cast<const char*>(data);
  if (!chunked) array->set_data(bytes, nbytes);

  impl_->routed<bool>(target, true, [&](pb::Backend::Stub* via) {
    grpc::ClientContext ctx;
    impl_->prepare(&ctx, impl_->options.timeout + nbytes / kStreamMinRate);
    pb::SetArrayResponse reply;
    auto writer = via->SetArray(&ctx, &reply);
    bool open = writer->Write(first);
    for (std::size_t at = 0; chunked && open && at < nbytes; at += kChunkBytes) {
      pb::SetArrayRequest piece;
      piece.set_data(bytes + at, std::min(kChunkBytes, nbytes - at));
      open = writer->Write(piece);
    }
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    if (!status.ok()) throw status_error(ctx, status);
    return true;
  });
}

ObjectRef Client::create_object(const std::string& class_name, const std::string& args_json,
                                const std::string& kwargs_json, const std::string& alias,
                                const std::string& backend_id) {
  pb::CreateObjectRequest request;
  request.set_class_name(class_name);
  request.set_args_json(args_json);
  request.set_kwargs_json(kwargs_json);
  request.set_alias(alias);
  request.set_backend_id(backend_id);
  return ref_of(impl_->unary(&pb::Backend::Stub::CreateObject, request,
                             impl_->options.call_timeout).ref());
}

void Client::remove(const Target& target) {
  pb::DeleteObjectRequest request;
  set_target(&request, target);
  impl_->unary(&pb::Backend::Stub::DeleteObject, request, impl_->options.timeout);
}

std::pair<std::string, std::string> Client::locate(const Target& target) {
  return impl_->locate(target);
}

std::vector<BackendInfo> Client::backends() {
  auto reply = impl_->unary(&pb::Backend::Stub::ListBackends, pb::ListBackendsRequest(),
                            impl_->options.timeout);
  std::vector<BackendInfo> out;
  for (const auto& b : reply.backends()) {
    out.push_back(BackendInfo{b.backend_id(), b.address(), b.host(), b.pid(), b.up(),
                              b.objects(), b.memory_bytes()});
  }
  return out;
}

}  // namespace claypot
