//! TCP flow tracking and client→server stream reassembly (sans-IO). (to be written)
