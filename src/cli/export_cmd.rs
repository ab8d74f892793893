//! `dspy-agent export kubernetes`: the stack's services as Kubernetes objects.

use super::*;
use crate::kubernetes;

pub(super) fn export_kubernetes(
    options: LoadOptions,
    output: Option<PathBuf>,
    namespace: Option<String>,
) -> Result<i32, Failure> {
    if let Some(ns) = &namespace {
        crate::config::spec::validate_name("--namespace", ns)?;
    }
    let config = Config::load(options)?;
    let exported = kubernetes::export(&config, namespace.as_deref())
        .map_err(|e| fail(format!("error: {e}")))?;
    match output {
        None => {
            let docs: Vec<String> = exported
                .iter()
                .map(|e| format!("# service {}\n{}", e.service, e.yaml))
                .collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
            for e in &exported {
                let path = dir.join(format!("{}.yaml", e.service));
                // A Secret's values are readable by the owner only.
                write_file(&path, &e.yaml, e.secret)
                    .map_err(|err| fail(format!("cannot write {}: {err}", path.display())))?;
            }
            eprintln!(
                "wrote {} file{} into {} (`kubectl apply -f {}` applies them)",
                exported.len(),
                if exported.len() == 1 { "" } else { "s" },
                dir.display(),
                dir.display()
            );
        }
    }
    let notes: Vec<&String> = exported.iter().flat_map(|e| &e.notes).collect();
    if !notes.is_empty() {
        eprintln!("carried differently:");
        for n in notes {
            eprintln!("  {n}");
        }
    }
    Ok(EXIT_OK)
}
