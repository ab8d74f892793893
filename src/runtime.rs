//! The one tokio runtime of the process: the Python bindings hand it to pyo3-async-runtimes,
//! the command line and the daemon block on it.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

pub fn get() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .thread_name("dspy-agent-infra")
            .enable_all()
            .build()
            .expect("the OS lets a process start threads")
    })
}
