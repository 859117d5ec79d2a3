// claypot C++ client: reach persistent objects of a claypot cluster from C++.
//
// It speaks claypot's gRPC contract (proto/claypot.proto): method calls and
// attribute values as JSON text (CallJson), numpy arrays as typed arrays
// (GetArray / SetArray: dtype, shape, byte order and raw row-major bytes,
// chunked above the inline limit). It never sends pickle. Every call goes to
// the backend you connected to, which forwards it to the object's owner.
//
// Every failure throws claypot::Error, whose code() is a claypot error name
// (AliasNotFound, RemoteError, ...) and grpc_status() the gRPC status code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace claypot {

// A persistent object's identity, class and owner backend.
struct ObjectRef {
  std::string object_id;
  std::string class_key;
  std::string backend_id;
};

// An object named by alias (a string) or by the ObjectRef get_by_alias returned.
class Target {
 public:
  Target(const char* alias) : alias_(alias) {}             // NOLINT: implicit on purpose
  Target(std::string alias) : alias_(std::move(alias)) {}  // NOLINT
  Target(const ObjectRef& ref)  // NOLINT
      : object_id_(ref.object_id), backend_id_(ref.backend_id) {}
  static Target by_id(std::string object_id) {
    Target t{ObjectRef{std::move(object_id), "", ""}};
    return t;
  }
  const std::string& alias() const { return alias_; }
  const std::string& object_id() const { return object_id_; }
  const std::string& backend_id() const { return backend_id_; }  // the owner, when known

 private:
  std::string alias_;
  std::string object_id_;
  std::string backend_id_;
};

// One backend of the cluster.
struct BackendInfo {
  std::string backend_id;
  std::string address;
  std::string host;
  int64_t pid = 0;
  bool up = false;
  int64_t objects = 0;
  int64_t memory_bytes = 0;
};

// A failure: code() names a store.errors class (or RemoteError for an
// exception raised by Python code, whose type is remote_type()).
class Error : public std::runtime_error {
 public:
  Error(std::string code, const std::string& message, int grpc_status,
        std::string remote_type = "")
      : std::runtime_error(code + ": " + message),
        code_(std::move(code)),
        grpc_status_(grpc_status),
        remote_type_(std::move(remote_type)) {}
  const std::string& code() const { return code_; }
  // A grpc::StatusCode value (0 OK, 5 NOT_FOUND, 16 UNAUTHENTICATED, ...).
  int grpc_status() const { return grpc_status_; }
  const std::string& remote_type() const { return remote_type_; }

 private:
  std::string code_;
  int grpc_status_;
  std::string remote_type_;
};

// An n-dimensional array in one contiguous, row-major buffer, in this
// machine's byte order (bool as uint8, complex as interleaved re/im floats).
struct Array {
  std::string dtype;             // numpy name: float64, int32, ...
  std::vector<uint64_t> shape;   // empty for a 0-d array
  std::vector<unsigned char> data;

  // Element count (product of shape).
  uint64_t size() const;
  // Bytes per element of dtype.
  std::size_t itemsize() const;
  // The data as T; throws Error(ProtocolError) if T does not match dtype.
  template <class T>
  const T* as() const {
    check_type(typeid(T), sizeof(T));
    return reinterpret_cast<const T*>(data.data());
  }
  template <class T>
  T* as() {
    check_type(typeid(T), sizeof(T));
    return reinterpret_cast<T*>(data.data());
  }

 private:
  void check_type(const std::type_info& type, std::size_t size) const;
};

struct Options {
  std::string token;           // the cluster token (claypot-token metadata)
  double timeout = 10;         // seconds for directory calls
  double call_timeout = 600;   // seconds for a method call or an array transfer
  std::string ca_pem;          // PEM of the backends' CA: use TLS when set
  // Send typed-array reads and writes straight to the object's owner (at the
  // address it registered) instead of through the backend connected to; an
  // owner that does not answer within `timeout` is skipped for the gateway.
  bool direct = false;
};

// One Client may be used from several threads.
class Client {
 public:
  // Connects through the backend at address ("host:port") and pings it.
  Client(const std::string& address, Options options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Identity of the backend connected to.
  std::string backend_id();
  ObjectRef get_by_alias(const std::string& alias);
  // Run a method: args_json is a JSON array, kwargs_json a JSON object (or
  // empty). Returns the result as JSON text ("null" for None).
  std::string call(const Target& target, const std::string& method,
                   const std::string& args_json = "[]", const std::string& kwargs_json = "");
  // Read / write an attribute as JSON text.
  std::string get(const Target& target, const std::string& name);
  void set(const Target& target, const std::string& name, const std::string& value_json);
  // Read a numpy attribute, or the numpy result of a method, as an Array.
  Array get_array(const Target& target, const std::string& name);
  Array call_array(const Target& target, const std::string& method,
                   const std::string& args_json = "[]", const std::string& kwargs_json = "");
  // Read a numpy attribute straight into the caller's buffer of capacity
  // bytes (Error ValueTooLarge if it does not fit); returns the header
  // (dtype, shape) with empty data.
  Array read_array_into(const Target& target, const std::string& name, void* buffer,
                        std::size_t capacity);
  // Write a contiguous row-major buffer as a numpy array attribute.
  void set_array(const Target& target, const std::string& name, const std::string& dtype,
                 const std::vector<uint64_t>& shape, const void* data, std::size_t nbytes);
  // Make an object of a class the cluster knows (registry key or class name)
  // with JSON constructor arguments.
  ObjectRef create_object(const std::string& class_name, const std::string& args_json = "[]",
                          const std::string& kwargs_json = "", const std::string& alias = "",
                          const std::string& backend_id = "");
  void remove(const Target& target);  // delete the object
  std::vector<BackendInfo> backends();
  // The owner backend of an object and its registered address (cached).
  std::pair<std::string, std::string> locate(const Target& target);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace claypot
