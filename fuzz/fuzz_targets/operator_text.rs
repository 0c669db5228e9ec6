//! Operator and control input: meshd.toml, policy files, control-socket request lines,
//! certificate PEM. Bad input must give an error, never a panic (invariant 5).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_proto::cert::Certificate;
use mesh_proto::config::Config;
use mesh_proto::control::Request;
use mesh_proto::policy::{self, DefaultAction};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => {
            let _ = Config::parse(Path::new("/etc/mesh/meshd.toml"), text);
        }
        1 => {
            let _ = policy::load("fuzz.toml", text, DefaultAction::Deny);
        }
        2 => {
            let _ = Request::parse(text);
        }
        _ => {
            let _ = Certificate::from_pem(text);
        }
    }
});
