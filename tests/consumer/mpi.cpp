// The mpi component: the MPI reducer's header compiles and links (running it
// needs mpirun; tests/test_distributed_mpi.cpp does that).
#include <vqkit/distributed/mpi.hpp>
#include <vqkit/quantizer.hpp>

int main(int argc, char** argv) {
  if (argc > 1) {  // never taken by the test: link check only
    MPI_Init(&argc, &argv);
    vqkit::MpiReducer r(MPI_COMM_WORLD);
    MPI_Finalize();
  }
  return 0;
}
