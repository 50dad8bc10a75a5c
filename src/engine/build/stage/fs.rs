//! COPY, ADD and WORKDIR: steps applied through the filesystem helper (`fsop`, a real
//! overlay mount in a private mount namespace), cached by the state key and, for COPY/ADD
//! from the context, by a digest of exactly the context files they copy.

use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::{join_path, ImageState, StageCtx, StageRunner};
use crate::engine::{
    build::{
        cache::StateKey,
        fsop::{self, FsAction, FsOp, FsSource, Overlay},
        pull, securejoin, ContextHashError, EngineError,
    },
    dockerfile::{self, expand_heredoc},
    remote::{self, RemoteError},
};

/// What a COPY or ADD line says, expanded.
struct CopyLine {
    keyword: &'static str,
    dest: String,
    chown: Option<String>,
    chmod: Option<u32>,
    sources: Vec<String>,
    /// ADD `--checksum=sha256:<hex>` (only with one URL source).
    checksum: Option<String>,
    created_by: String,
}

impl StageRunner<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fs_step(
        &self,
        state: ImageState,
        line: usize,
        step: &str,
        created_by: &str,
        source: Option<FsSource>,
        actions: Vec<FsAction>,
        skip_if_empty: bool,
    ) -> Result<ImageState, EngineError> {
        if let Some(hit) = self.cached(&state, step, created_by) {
            return Ok(hit);
        }
        let dir = self.step_dir("fs-")?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(EngineError::io("creating overlay directories"))?;
        }
        let op = FsOp {
            target: Overlay {
                lowers: state.lowers(),
                upper: upper.clone(),
                work,
            },
            source,
            actions,
            scratch: dir.join("mnt"),
        };
        fsop::apply(&self.engine.config().exe, &op)
            .await
            .map_err(|e| EngineError::step(line, e))?;
        self.commit_layer(state, step, &upper, created_by, skip_if_empty)
            .await
    }

    /// WORKDIR: the directory is created (an empty layer is skipped), with any missing
    /// parents, owned by the USER in effect (as BuildKit does); an existing one is untouched.
    pub(super) async fn workdir_step(
        &self,
        ctx: &StageCtx<'_>,
        mut state: ImageState,
        line: usize,
        dir: &str,
    ) -> Result<ImageState, EngineError> {
        let dir = self.word(ctx, &state, line, dir)?;
        let path = join_path(&Self::cwd(&state), &dir);
        state.config.config.working_dir = Some(path.clone());
        let created_by = format!("WORKDIR {path}");
        // The step key names the owner: a layer cached before WORKDIR honoured USER (root-owned
        // directories, same state key) is not reused for it.
        let owner = state.config.config.user.clone().filter(|u| !u.is_empty());
        let step = match &owner {
            Some(user) => format!("{created_by}\0{user}"),
            None => created_by.clone(),
        };
        let actions = vec![FsAction::Mkdir { path, owner }];
        self.fs_step(state, line, &step, &created_by, None, actions, true)
            .await
    }

    /// COPY or ADD (`is_add`): from heredocs, the context, a stage or an image.
    pub(super) async fn copy_step(
        &self,
        ctx: &StageCtx<'_>,
        state: ImageState,
        line: usize,
        spec: &dockerfile::CopySpec,
        is_add: bool,
    ) -> Result<ImageState, EngineError> {
        let copy = self.copy_line(ctx, &state, line, spec, is_add)?;
        if copy.sources.iter().any(|s| remote::is_http_url(s)) {
            if !spec.heredocs.is_empty() {
                return Err(EngineError::at(
                    line,
                    "ADD: heredocs and URLs in one instruction are not supported",
                ));
            }
            return self.add_remote_step(state, line, &copy).await;
        }
        let (source, actions, inputs) = if spec.heredocs.is_empty() {
            let action = FsAction::Copy {
                sources: copy.sources.clone(),
                dest: copy.dest.clone(),
                chown: copy.chown.clone(),
                chmod: copy.chmod,
                extract: is_add,
            };
            let (source, inputs) = self.copy_source(ctx, line, spec, &copy).await?;
            (Some(source), vec![action], inputs)
        } else {
            (
                None,
                self.heredoc_files(ctx, &state, line, spec, &copy)?,
                String::new(),
            )
        };
        let step = format!("{}\0{inputs}", copy.created_by);
        self.fs_step(state, line, &step, &copy.created_by, source, actions, false)
            .await
    }

    /// Expands and checks the destination, flags and sources of a COPY/ADD.
    fn copy_line(
        &self,
        ctx: &StageCtx<'_>,
        state: &ImageState,
        line: usize,
        spec: &dockerfile::CopySpec,
        is_add: bool,
    ) -> Result<CopyLine, EngineError> {
        let exp = |w: &str| self.word(ctx, state, line, w);
        let keyword = if is_add { "ADD" } else { "COPY" };
        let dest_raw = exp(&spec.dest)?;
        let mut dest = join_path(&Self::cwd(state), &dest_raw);
        if (dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.")) && !dest.ends_with('/') {
            dest.push('/');
        }
        let chown = spec.chown.as_deref().map(exp).transpose()?;
        let chmod = match spec.chmod.as_deref().map(exp).transpose()? {
            None => None,
            Some(m) => Some(u32::from_str_radix(&m, 8).map_err(|_| {
                EngineError::at(
                    line,
                    format!("{keyword} --chmod={m}: expected an octal mode such as 0755"),
                )
            })?),
        };
        let sources: Vec<String> = spec.sources.iter().map(|s| exp(s)).collect::<Result<_, _>>()?;
        for s in &sources {
            if is_git_source(s) {
                return Err(EngineError::at(
                    line,
                    format!("{keyword} {s}: git sources are not supported; clone in a RUN step"),
                ));
            }
            if remote::is_http_url(s) {
                if !is_add {
                    return Err(EngineError::at(
                        line,
                        format!("COPY {s}: a source can't be a URL for COPY (use ADD)"),
                    ));
                }
                if spec.unpack == Some(true) {
                    return Err(EngineError::at(
                        line,
                        format!("ADD --unpack=true {s}: unpacking remote archives is not supported"),
                    ));
                }
            }
        }
        let checksum = spec.checksum.as_deref().map(exp).transpose()?;
        if let Some(checksum) = &checksum {
            // BuildKit's rules (dockerfile2llb `dispatchCopy`).
            let refuse = |why: &str| {
                Err(EngineError::at(
                    line,
                    format!("{keyword} --checksum={checksum}: {why}"),
                ))
            };
            if !is_add {
                return refuse("checksum can't be specified for COPY");
            }
            if sources.len() != 1 || !spec.heredocs.is_empty() {
                return refuse("checksum can't be specified for multiple sources");
            }
            if !remote::is_http_url(&sources[0]) {
                return refuse("checksum can't be specified for non-HTTP(S) sources");
            }
            let hex = checksum.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return refuse("expected sha256: and 64 lowercase hex digits");
            }
        }
        let created_by = format!(
            "{keyword}{}{}{} {} {dest}",
            spec.from
                .as_deref()
                .map(|f| format!(" --from={f}"))
                .unwrap_or_default(),
            chown
                .as_deref()
                .map(|c| format!(" --chown={c}"))
                .unwrap_or_default(),
            chmod.map(|m| format!(" --chmod={m:o}")).unwrap_or_default(),
            sources.join(" "),
        );
        Ok(CopyLine {
            keyword,
            dest,
            chown,
            chmod,
            sources,
            checksum,
            created_by,
        })
    }

    /// ADD with http(s) URLs among its sources (BuildKit's `llb.HTTP`; see
    /// [`crate::engine::remote`] for what may be downloaded). Each URL becomes one file,
    /// never unpacked; the other sources are copied from the context as by any ADD.
    ///
    /// The step's key covers each URL and the digest and mtime of what it brought, so every
    /// run of the step downloads first, then finds the layer in the cache if nothing
    /// changed. With `--checksum`, the key is the URL and that checksum (as in BuildKit):
    /// a cached step is not downloaded again.
    async fn add_remote_step(
        &self,
        state: ImageState,
        line: usize,
        copy: &CopyLine,
    ) -> Result<ImageState, EngineError> {
        let policy = &self.engine.config().remote;
        let several = copy.sources.len() > 1;
        let mut inputs = String::new();
        if let Some(checksum) = &copy.checksum {
            inputs = format!("{}\0{checksum}", copy.sources[0]);
            let step = format!("{}\0{inputs}", copy.created_by);
            if let Some(hit) = self.cached(&state, &step, &copy.created_by) {
                return Ok(hit);
            }
        }
        let downloads = self.step_dir("add-url-")?;
        let result = async {
            let mut actions = Vec::new();
            let mut local = Vec::new();
            let flush_local = |local: &mut Vec<String>, actions: &mut Vec<FsAction>| {
                if !local.is_empty() {
                    actions.push(FsAction::Copy {
                        sources: std::mem::take(local),
                        dest: copy.dest.clone(),
                        chown: copy.chown.clone(),
                        chmod: copy.chmod,
                        extract: true,
                    });
                }
            };
            let mut local_sources = Vec::new();
            let mut remote_inputs = String::new();
            for (i, source) in copy.sources.iter().enumerate() {
                if !remote::is_http_url(source) {
                    local.push(source.clone());
                    local_sources.push(source.clone());
                    continue;
                }
                flush_local(&mut local, &mut actions);
                let url = reqwest::Url::parse(source).map_err(|_| {
                    EngineError::step_in(line, "ADD", RemoteError::BadUrl { url: source.clone() })
                })?;
                let file = downloads.join(format!("{i}"));
                let got = remote::download(&url, policy, &file, copy.checksum.as_deref())
                    .await
                    .map_err(|e| EngineError::step_in(line, "ADD", e))?;
                remote_inputs.push_str(&format!("{source}\0{}\0{}\0", got.digest, got.mtime));
                actions.push(FsAction::Place {
                    file: got.path,
                    dest: copy.dest.clone(),
                    name: remote::file_name_of(&url),
                    several,
                    chown: copy.chown.clone(),
                    chmod: copy.chmod,
                    mtime: got.mtime,
                });
            }
            flush_local(&mut local, &mut actions);
            let (source, local_digest) = if local_sources.is_empty() {
                (None, String::new())
            } else {
                let digest = self.context_digest(line, "ADD", local_sources).await?;
                (Some(self.context_source()), digest)
            };
            if copy.checksum.is_none() {
                inputs = format!("{remote_inputs}{local_digest}");
            }
            let step = format!("{}\0{inputs}", copy.created_by);
            self.fs_step(state, line, &step, &copy.created_by, source, actions, false)
                .await
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&downloads).await;
        result
    }

    /// The files `COPY <<EOF` writes, expanded unless the heredoc's delimiter was quoted.
    fn heredoc_files(
        &self,
        ctx: &StageCtx<'_>,
        state: &ImageState,
        line: usize,
        spec: &dockerfile::CopySpec,
        copy: &CopyLine,
    ) -> Result<Vec<FsAction>, EngineError> {
        let mut actions = Vec::new();
        for doc in &spec.heredocs {
            let body = doc.body();
            let content = if doc.expand {
                expand_heredoc(&body, &|n: &str| ctx.args.lookup(&state.config, n))
                    .map_err(|e| EngineError::step(line, e))?
            } else {
                body
            };
            actions.push(FsAction::Write {
                dest: copy.dest.clone(),
                name: doc.name.clone(),
                content: content.into_bytes(),
                chown: copy.chown.clone(),
                chmod: copy.chmod,
            });
        }
        Ok(actions)
    }

    /// Where a COPY/ADD reads from (the context, an earlier stage or an image) and what of it
    /// the step's cache key covers: a digest of the context files it copies, or the source
    /// state's key.
    async fn copy_source(
        &self,
        ctx: &StageCtx<'_>,
        line: usize,
        spec: &dockerfile::CopySpec,
        copy: &CopyLine,
    ) -> Result<(FsSource, String), EngineError> {
        let keyword = copy.keyword;
        let Some(from) = spec.from.as_deref() else {
            let digest = self.context_digest(line, keyword, copy.sources.clone()).await?;
            return Ok((self.context_source(), digest));
        };
        // The parser refused any variable in --from (as BuildKit does): the name is literal.
        let src_state = self
            .state_from(ctx, line, &format!("{keyword} --from={from}"), from)
            .await?;
        let source = FsSource::Layers {
            lowers: src_state.lowers(),
        };
        Ok((source, src_state.key.hex()))
    }

    /// The build context as a source of files.
    pub(super) fn context_source(&self) -> FsSource {
        FsSource::Context {
            dir: self.input.context.clone(),
            ignore: self.input.dockerignore.clone(),
        }
    }

    /// A digest of the context files `sources` name (see [`context_inputs_digest`]);
    /// `keyword` names the step in errors.
    pub(super) async fn context_digest(
        &self,
        line: usize,
        keyword: &str,
        sources: Vec<String>,
    ) -> Result<String, EngineError> {
        // Hashing reads whole files: off the async threads, and bounded.
        let (context, ignore) = (self.input.context.clone(), self.input.dockerignore.clone());
        tokio::task::spawn_blocking(move || {
            context_inputs_digest(
                &context,
                &ignore,
                &sources,
                crate::engine::context::MAX_CONTEXT_HASH_BYTES,
            )
        })
        .await
        .map_err(|e| EngineError::step_in(line, format!("{keyword}: hashing its sources"), e))?
        .map_err(|e| EngineError::step_in(line, keyword, e))
    }

    /// The state a `--from=<from>` names: an earlier stage (built already) or an image,
    /// pulled. `step` names the step in errors.
    pub(super) async fn state_from(
        &self,
        ctx: &StageCtx<'_>,
        line: usize,
        step: &str,
        from: &str,
    ) -> Result<ImageState, EngineError> {
        if let Some(i) = self.stage_index(from, ctx.stage_index) {
            return ctx
                .done
                .get(&i)
                .cloned()
                .ok_or_else(|| EngineError::at(line, format!("{step}: stage not built")));
        }
        // An image is read for the platform of the stage that copies from it.
        let platform = &ctx.platform;
        let image = self
            .image_for(from, platform)
            .map_err(|e| EngineError::step_in(line, step, e))?;
        let pulled = pull::pull(self.engine, &image, platform, &self.input.auth, self.lease)
            .await
            .map_err(|e| e.on_line(line, step))?;
        let digest = pulled.reference.digest().cloned().expect("pinned");
        Ok(ImageState {
            config: pulled.config,
            layers: pulled.layers,
            key: StateKey::of_image(&digest),
            platform: platform.clone(),
        })
    }
}

/// Whether an ADD/COPY source names a git repository as BuildKit sees one
/// (`gitutil.ParseGitRef`): `git@host:repo`, a `git://` or `ssh://` URL, or an http(s) URL
/// whose path ends with `.git` (before a `#ref`).
fn is_git_source(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    if lower.starts_with("git@") || lower.starts_with("git://") || lower.starts_with("ssh://") {
        return true;
    }
    if !remote::is_http_url(source) {
        return false;
    }
    let without_ref = lower.split('#').next().unwrap_or_default();
    let path = without_ref.split('?').next().unwrap_or_default();
    path.trim_end_matches('/').ends_with(".git")
}

/// A digest of the context files the sources of one COPY/ADD name (after `.dockerignore`):
/// paths, types, modes and contents. A changed file changes it; an unrelated one does not.
///
/// Sources resolve inside the context exactly as the copy itself resolves them (a symlink
/// to `/etc` means `<context>/etc`), and the walk below them never follows a symlink: no
/// host file outside the context is ever read, listed or hashed. More than `limit` bytes of
/// file content fail the step. Errors name paths inside the context. Blocking.
fn context_inputs_digest(
    context: &Path,
    ignore: &str,
    sources: &[String],
    limit: u64,
) -> Result<String, ContextHashError> {
    use std::os::unix::fs::PermissionsExt;
    let ignore = crate::engine::context::DockerIgnore::parse(ignore);
    let shown = |path: &Path| {
        path.strip_prefix(context)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    let mut budget = limit;
    let mut h = Sha256::new();
    for source in sources {
        h.update(source.as_bytes());
        h.update([0]);
        let matches = fsop::glob_sources(context, source, Some(&ignore));
        for rel in matches {
            let root = securejoin::resolve_in_root(context, &rel, true).map_err(|source| {
                ContextHashError::Resolve {
                    path: rel.clone(),
                    source,
                }
            })?;
            if std::fs::symlink_metadata(&root).is_err() {
                return Err(ContextHashError::NotFound {
                    source_path: source.clone(),
                });
            }
            for entry in walkdir::WalkDir::new(&root)
                .sort_by_file_name()
                .follow_links(false)
                .follow_root_links(false)
            {
                let entry = entry.map_err(|e| ContextHashError::Io {
                    path: e.path().map(&shown).unwrap_or_else(|| rel.clone()),
                    source: e.into(),
                })?;
                let rel_entry = shown(entry.path());
                let meta = entry.path().symlink_metadata().map_err(io_error(&rel_entry))?;
                if entry.depth() > 0 && ignore.is_excluded(&rel_entry, meta.is_dir()) && !meta.is_dir() {
                    continue;
                }
                h.update(rel_entry.as_bytes());
                h.update(meta.permissions().mode().to_le_bytes());
                if meta.file_type().is_symlink() {
                    h.update(
                        std::fs::read_link(entry.path())
                            .map_err(io_error(&rel_entry))?
                            .to_string_lossy()
                            .as_bytes(),
                    );
                } else if meta.is_file() {
                    budget = budget
                        .checked_sub(meta.len())
                        .ok_or_else(|| ContextHashError::TooLarge {
                            source_path: source.clone(),
                            limit,
                        })?;
                    let file = std::fs::File::open(entry.path()).map_err(io_error(&rel_entry))?;
                    let mut fh = Sha256::new();
                    // A file that grows while it is read still stops at its measured size.
                    std::io::copy(&mut std::io::Read::take(file, meta.len()), &mut fh)
                        .map_err(io_error(&rel_entry))?;
                    h.update(fh.finalize());
                }
                h.update([0xff]);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// A read of `path` (relative to the context) that failed.
fn io_error(path: &str) -> impl FnOnce(std::io::Error) -> ContextHashError + '_ {
    move |source| ContextHashError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_sources_are_told_from_files_and_urls() {
        for git in [
            "git@github.com:moby/buildkit.git#v0.12",
            "git://example.com/repo",
            "ssh://git@example.com/repo.git",
            "https://github.com/moby/buildkit.git",
            "https://github.com/moby/buildkit.git#main:docs",
        ] {
            assert!(is_git_source(git), "{git}");
        }
        for not_git in [
            "https://example.com/file.tar.gz",
            "https://example.com/a.git/file",
            "src/x.git",
            "git-notes.txt",
        ] {
            assert!(!is_git_source(not_git), "{not_git}");
        }
    }

    #[test]
    fn context_hashing_stays_in_the_context_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(host.join("secret"), "one").unwrap();
        std::os::unix::fs::symlink(&host, ctx.join("link")).unwrap();
        // The symlink resolves to `<ctx>/<host path>`, which does not exist.
        let err = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("not found"), "{err}");
        assert!(!err.contains(&*host.to_string_lossy()), "{err}");
        let inside = ctx.join(host.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("secret"), "context").unwrap();
        let first = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap();
        std::fs::write(host.join("secret"), "two").unwrap();
        let second = context_inputs_digest(&ctx, "", &["link/secret".into()], 1 << 20).unwrap();
        assert_eq!(first, second, "host content changed the digest");
        assert!(context_inputs_digest(&ctx, "", &["link/secret".into()], 3)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }
}
