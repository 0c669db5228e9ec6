//! The network-namespace test harness. (to be written)
