// Test driver for tests/test_cpp_client.py: exercises the parts of the C++
// client the example does not, against a real cluster, and prints one JSON line.
//
//   CLAYPOT_TOKEN=... claypot_roundtrip ADDRESS ALIAS CLASS N [direct]
//
// On the object ALIAS (a Python object with a numpy attribute `samples`):
// writes N float64 values i * 0.25 with set_array as `samples` (chunked when
// large) and a 2x3 int32 array as `small`, reads `samples` back with
// read_array_into (and once into a buffer one byte too small), then creates an
// object of CLASS with alias ALIAS-cpp, calls `total` on it, and deletes it.
// With `direct`, arrays go straight to the owner (Options::direct).
#include <claypot/client.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5 && !(argc == 6 && std::string(argv[5]) == "direct")) {
    std::cerr << "usage: claypot_roundtrip ADDRESS ALIAS CLASS N [direct]\n";
    return 2;
  }
  const std::string address = argv[1], alias = argv[2], cls = argv[3];
  const std::size_t n = std::strtoull(argv[4], nullptr, 10);
  claypot::Options options;
  options.token = std::getenv("CLAYPOT_TOKEN") ? std::getenv("CLAYPOT_TOKEN") : "";
  options.direct = argc == 6;
  try {
    claypot::Client client(address, options);
    std::vector<double> values(n);
    for (std::size_t i = 0; i < n; ++i) values[i] = static_cast<double>(i) * 0.25;
    client.set_array(alias, "samples", "float64", {n}, values.data(), n * sizeof(double));
    const int32_t small[6] = {1, -2, 3, -4, 5, -6};
    client.set_array(alias, "small", "int32", {2, 3}, small, sizeof(small));

    std::vector<double> back(n);
    claypot::Array header = client.read_array_into(alias, "samples", back.data(),
                                                   back.size() * sizeof(double));
    const bool same = std::memcmp(back.data(), values.data(), n * sizeof(double)) == 0;
    std::string too_small;
    try {
      client.read_array_into(alias, "samples", back.data(), n * sizeof(double) - 1);
    } catch (const claypot::Error& err) {
      too_small = err.code();
    }
    claypot::Array ints = client.get_array(alias, "small");
    const int32_t* got = ints.as<int32_t>();
    std::string wrong_type;
    try {
      ints.as<double>();
    } catch (const claypot::Error& err) {
      wrong_type = err.code();
    }

    claypot::ObjectRef made = client.create_object(cls, "[3]", "", alias + "-cpp");
    std::string total = client.call(made, "total");
    client.remove(made);
    std::string after_delete;
    try {
      client.get_by_alias(alias + "-cpp");
    } catch (const claypot::Error& err) {
      after_delete = err.code();
    }
    std::cout << "{\"same\":" << (same ? "true" : "false") << ",\"dtype\":\"" << header.dtype
              << "\",\"n\":" << header.shape.at(0) << ",\"too_small\":\"" << too_small
              << "\",\"ints\":[" << got[0] << "," << got[5] << "],\"int_shape\":["
              << ints.shape.at(0) << "," << ints.shape.at(1) << "],\"wrong_type\":\""
              << wrong_type << "\",\"made_backend\":\"" << made.backend_id
              << "\",\"total\":" << total << ",\"after_delete\":\"" << after_delete
              << "\",\"backends\":" << client.backends().size() << ",\"owner_address\":\""
              << client.locate(alias).second << "\"}" << std::endl;
    return 0;
  } catch (const claypot::Error& err) {
    std::cout << "{\"error\":\"" << err.code() << "\"}" << std::endl;
    std::cerr << err.what() << "\n";
    return 1;
  }
}
