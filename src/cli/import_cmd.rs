//! `dspy-agent import docker-compose.yml`: writes the equivalent `dspy-agent.toml`.

use std::path::Path;

use super::*;
use crate::config::compose::{self, ImportOptions};

pub(super) struct ImportArgs {
    pub file: PathBuf,
    pub output: Option<PathBuf>,
    pub services: Option<Vec<String>>,
    pub profiles: Vec<String>,
    pub force: bool,
}

pub(super) fn import(options: LoadOptions, args: ImportArgs) -> Result<i32, Failure> {
    let usage = |m: String| Failure(EXIT_USAGE, m);
    let source = options.cwd.join(&args.file);
    let text = std::fs::read_to_string(&source)
        .map_err(|e| usage(format!("error: cannot read {}: {e}", source.display())))?;
    let to_stdout = args.output.as_deref() == Some(Path::new("-"));
    let output = options.cwd.join(
        args.output
            .clone()
            .filter(|_| !to_stdout)
            .unwrap_or_else(|| CONFIG_FILE_NAME.into()),
    );
    let folder = |p: &Path| {
        p.parent()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()))
            .unwrap_or_else(|| options.cwd.clone())
    };
    let output_dir = if to_stdout {
        options.cwd.clone()
    } else {
        folder(&output)
    };
    let import_options = ImportOptions {
        compose_dir: folder(&source),
        output_dir: output_dir.clone(),
        services: args.services,
        profiles: args.profiles,
        env: options.env.clone(),
    };
    let imported = compose::import(&source.display().to_string(), &text, &import_options)?;
    // What the file says must start as it is: checked as the only layer, before writing.
    let problems = Config::problems_of_layer(imported.layer.clone(), &output_dir);
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        return Err(usage(format!(
            "error: the imported config would not start ({} problem{}); nothing was written:\n{}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            list.join("\n")
        )));
    }
    let secrets = imported
        .layer
        .services
        .values()
        .any(|s| s.secret_env.as_ref().is_some_and(|v| !v.is_empty()));
    if to_stdout {
        print!("{}", imported.text);
    } else {
        if output.exists() && !args.force {
            return Err(fail(format!(
                "{} already exists; `--force` replaces it, or `-o` names another file (`-o -` prints it)",
                output.display()
            )));
        }
        write_file(&output, &imported.text, secrets)
            .map_err(|e| fail(format!("cannot write {}: {e}", output.display())))?;
        eprintln!(
            "wrote {}: {} service{} ({}){}",
            output.display(),
            imported.services.len(),
            if imported.services.len() == 1 {
                ""
            } else {
                "s"
            },
            imported.services.join(", "),
            if secrets {
                "; readable by you only, as it holds secret values"
            } else {
                ""
            }
        );
    }
    if !imported.not_carried.is_empty() {
        eprintln!("not carried, or carried differently (each also noted in the file):");
        for note in &imported.not_carried {
            eprintln!("  {note}");
        }
    }
    Ok(EXIT_OK)
}
