// A C++ program working on a Python object of a claypot cluster:
//
//   CLAYPOT_TOKEN=... claypot_example ADDRESS ALIAS METHOD ARGS_JSON ARRAY_ATTR [OUT_FILE]
//
// It connects to the backend at ADDRESS with the token, resolves ALIAS, calls
// METHOD with the JSON array ARGS_JSON, reads the numpy attribute ARRAY_ATTR
// into one contiguous buffer, writes its raw bytes to OUT_FILE if given, and
// prints one JSON line: the object's id and owner, the call's JSON result, and
// the array's dtype, shape, byte count and (for float64) sum.
// Exit status: 0 on success, 1 on a claypot error (its code is printed), 2 on bad usage.
#include <claypot/client.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

int main(int argc, char** argv) {
  if (argc < 6 || argc > 7) {
    std::cerr << "usage: claypot_example ADDRESS ALIAS METHOD ARGS_JSON ARRAY_ATTR [OUT_FILE]\n"
                 "(the token is read from CLAYPOT_TOKEN)\n";
    return 2;
  }
  const std::string address = argv[1], alias = argv[2], method = argv[3], args = argv[4],
                    attr = argv[5];
  claypot::Options options;
  const char* token = std::getenv("CLAYPOT_TOKEN");
  options.token = token ? token : "";
  try {
    claypot::Client client(address, options);
    claypot::ObjectRef ref = client.get_by_alias(alias);
    std::string result = client.call(ref, method, args);
    claypot::Array array = client.get_array(ref, attr);

    std::ostringstream shape;
    for (std::size_t i = 0; i < array.shape.size(); ++i) shape << (i ? "," : "") << array.shape[i];
    std::ostringstream line;
    line.precision(17);
    line << "{\"object_id\":\"" << ref.object_id << "\",\"backend_id\":\"" << ref.backend_id
         << "\",\"result\":" << result << ",\"dtype\":\"" << array.dtype << "\",\"shape\":["
         << shape.str() << "],\"nbytes\":" << array.data.size();
    if (array.dtype == "float64") {
      const double* values = array.as<double>();
      double sum = 0;
      for (uint64_t i = 0; i < array.size(); ++i) sum += values[i];
      line << ",\"sum\":" << sum;
    }
    line << "}";
    if (argc == 7) {
      std::ofstream out(argv[6], std::ios::binary);
      out.write(reinterpret_cast<const char*>(array.data.data()),
                static_cast<std::streamsize>(array.data.size()));
      if (!out) {
        std::cerr << "cannot write " << argv[6] << "\n";
        return 1;
      }
    }
    std::cout << line.str() << std::endl;
    return 0;
  } catch (const claypot::Error& err) {
    std::cout << "{\"error\":\"" << err.code() << "\",\"grpc_status\":" << err.grpc_status()
              << "}" << std::endl;
    std::cerr << err.what() << "\n";
    return 1;
  }
}
