// bench/search_plain.cpp - the search as a consumer's program gets it: built
// by hand with the consumer's own flags (no CMake, no vqkit_dev_flags), it
// prints the median of 7 searches of 16384 x 1024 x 256 (float, L2) in ms.
// docs/performance.md builds it twice, with and without -march=native:
//   g++ -O3 -std=c++20 -fopenmp -Iinclude -I/usr/include/eigen3 bench/search_plain.cpp -o plain
//   g++ -O3 -march=native -std=c++20 -fopenmp -Iinclude -I/usr/include/eigen3 bench/search_plain.cpp -o native
//   ./plain 1; ./native 1    (argument: threads)
#include <vqkit/quantizer/nearest_code.hpp>
#include <vqkit/core/random.hpp>
#include <chrono>
#include <cstdio>
#include <vector>
#include <algorithm>
using namespace vqkit;
int main(int argc, char** argv){
  Rng r(1);
  RowMatrix<float> x(16384, 256), c(1024, 256);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(r.normal());
  for (Index i = 0; i < c.size(); ++i) c.data()[i] = float(r.normal());
  IndexVector idx(x.rows()); Vector<float> d;
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  std::vector<double> t;
  for (int rep = 0; rep < 7; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    nearest_code<float>(cpu{threads}, c, x, idx, &d);
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  printf("%.1f\n", t[3]);
}
