# mpi_env.sh - sourced by the tests that launch kvtrace under MPI (test_replay_mpi.sh,
# test_replay_multi_gpu.sh): MPIEXEC (mpiexec or mpirun; empty when neither is installed) and
# the environment that lets Open MPI run as root and more processes than cores (MPICH ignores
# it).
MPIEXEC=$(command -v mpiexec || command -v mpirun || true)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe # the same for Open MPI 5
