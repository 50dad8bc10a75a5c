//! `--secret` flags, as `docker buildx build --secret` reads them:
//! `id=ID[,src=FILE]`, `id=ID,env=VAR`, with `type=file|env` to say which when only `id` is
//! given (`source`/`src` name the file or variable either way). Without `src` or `env`, the
//! secret comes from the environment variable `ID` if it is set, else from the file `ID`.
//! The flag names where a secret is; its value is read here and never printed.

use std::path::Path;

use crate::model::{BuildSecrets, MAX_BUILD_SECRET_BYTES};

/// Where one `--secret` flag says its value is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SecretFrom {
    File(String),
    Env(String),
    /// Neither given: the variable `id` if set, else the file `id`.
    EnvOrFile,
}

/// One parsed `--secret` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretFlag {
    id: String,
    from: SecretFrom,
}

fn parse(flag: &str) -> Result<SecretFlag, String> {
    let usage = || format!("--secret {flag:?}: expected id=ID[,src=FILE|env=VAR]");
    let (mut id, mut kind, mut src, mut env) = (None, None, None, None);
    for field in flag.split(',') {
        let (key, value) = field.split_once('=').ok_or_else(usage)?;
        let slot = match key.trim().to_ascii_lowercase().as_str() {
            "id" => &mut id,
            "type" => &mut kind,
            "src" | "source" => &mut src,
            "env" => &mut env,
            other => return Err(format!("--secret {flag:?}: unknown key {other:?} ({})", usage())),
        };
        *slot = Some(value.to_owned());
    }
    let from = match (kind.as_deref(), src, env) {
        (_, Some(_), Some(_)) => return Err(format!("--secret {flag:?}: give src or env, not both")),
        (None | Some("file"), Some(path), None) => SecretFrom::File(path),
        (None | Some("env"), None, Some(var)) | (Some("env"), Some(var), None) => SecretFrom::Env(var),
        (None, None, None) => SecretFrom::EnvOrFile,
        (Some("file"), None, None) => SecretFrom::File(id.clone().unwrap_or_default()),
        (Some("env"), None, None) => SecretFrom::Env(id.clone().unwrap_or_default()),
        (Some("file"), None, Some(_)) => {
            return Err(format!("--secret {flag:?}: type=file reads src=FILE, not env"));
        }
        (Some(other), ..) => {
            return Err(format!("--secret {flag:?}: type={other} is not file or env"));
        }
    };
    let id = match id {
        Some(id) => id,
        // As buildx: without an id, the file's name is the id.
        None => match &from {
            SecretFrom::File(path) => Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(usage)?,
            _ => return Err(usage()),
        },
    };
    Ok(SecretFlag { id, from })
}

/// Reads every `--secret` flag's value.
pub fn read_secret_flags(flags: &[String]) -> Result<BuildSecrets, String> {
    let mut secrets = BuildSecrets::default();
    for flag in flags {
        let SecretFlag { id, from } = parse(flag)?;
        let value = match from {
            SecretFrom::File(path) => read_file(&id, &path)?,
            SecretFrom::Env(var) => std::env::var_os(&var)
                .ok_or_else(|| format!("--secret id={id}: the environment variable {var} is not set"))?
                .into_encoded_bytes(),
            SecretFrom::EnvOrFile => match std::env::var_os(&id) {
                Some(v) => v.into_encoded_bytes(),
                None => read_file(&id, &id)?,
            },
        };
        secrets.insert(id, value).map_err(|e| format!("--secret: {e}"))?;
    }
    Ok(secrets)
}

fn read_file(id: &str, path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| format!("--secret id={id}: reading {path}: {e}"))?;
    let mut value = Vec::new();
    // One byte more than allowed, so that a larger file is refused rather than cut.
    file.take(MAX_BUILD_SECRET_BYTES as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| format!("--secret id={id}: reading {path}: {e}"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(id: &str, from: SecretFrom) -> SecretFlag {
        SecretFlag { id: id.into(), from }
    }

    #[test]
    fn flags_parse_as_buildx_reads_them() {
        assert_eq!(
            parse("id=npmrc,src=/home/me/.npmrc").unwrap(),
            flag("npmrc", SecretFrom::File("/home/me/.npmrc".into()))
        );
        assert_eq!(
            parse("id=tok,env=GH_TOKEN").unwrap(),
            flag("tok", SecretFrom::Env("GH_TOKEN".into()))
        );
        assert_eq!(
            parse("id=tok,type=env,source=GH_TOKEN").unwrap(),
            flag("tok", SecretFrom::Env("GH_TOKEN".into()))
        );
        assert_eq!(
            parse("id=tok,type=env").unwrap(),
            flag("tok", SecretFrom::Env("tok".into()))
        );
        assert_eq!(
            parse("src=/run/keys/aws.cfg").unwrap(),
            flag("aws.cfg", SecretFrom::File("/run/keys/aws.cfg".into()))
        );
        assert_eq!(parse("id=x").unwrap(), flag("x", SecretFrom::EnvOrFile));
        for bad in [
            "npmrc",
            "id=a,src=f,env=V",
            "id=a,type=pipe",
            "id=a,colour=red",
            "env=V",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_come_from_files_and_variables_and_too_big_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("npmrc");
        std::fs::write(&file, "//registry/:_authToken=canary\n").unwrap();
        let secrets = read_secret_flags(&[format!("id=npmrc,src={}", file.display())]).unwrap();
        assert_eq!(
            secrets.expose("npmrc"),
            Some(&b"//registry/:_authToken=canary\n"[..])
        );
        let err = read_secret_flags(&["id=t,env=KILN_TEST_SURELY_UNSET_VAR".into()]).unwrap_err();
        assert!(err.contains("KILN_TEST_SURELY_UNSET_VAR is not set"), "{err}");
        std::fs::write(&file, vec![b'x'; MAX_BUILD_SECRET_BYTES + 1]).unwrap();
        let err = read_secret_flags(&[format!("id=big,src={}", file.display())]).unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }
}
