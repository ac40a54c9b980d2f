//! Remote agents loaded into a context's agent. NIXL keeps one entry per agent name, and
//! invalidating it removes it for every user; peers hold a `RemoteAgent` each, counted per name,
//! and the entry goes only with the last. Metadata is checked before NIXL parses any of it as
//! far as kvxfer can: the agent name it carries must be the one the export names, in UTF-8
//! (nixl-sys unwraps the name NIXL returns as UTF-8).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nixl_sys::Agent;

use crate::error::{Error, Result, bail};

/// How many live `RemoteAgent`s there are per agent name.
pub(crate) type RemoteCounts = Arc<Mutex<HashMap<String, usize>>>;

/// The first entry of NIXL's serialised metadata: `nixlSerDes|`, the tag `Agent`, a 64-bit
/// little-endian length, the name, `|`.
const HEADER: &[u8] = b"nixlSerDes|Agent";

/// The agent name inside NIXL metadata, checked to be UTF-8 without NUL.
fn md_agent_name(md: &[u8]) -> Result<&str> {
    let refuse = |why: &str| Error::Peer(format!("the peer's NIXL metadata is malformed: {why}"));
    let rest = md
        .strip_prefix(HEADER)
        .ok_or_else(|| refuse("it does not start with NIXL's agent entry"))?;
    let (len, rest) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| refuse("the agent name's length is cut off"))?;
    let len = usize::try_from(u64::from_le_bytes(*len))
        .ok()
        .filter(|&n| n > 0 && n < rest.len())
        .ok_or_else(|| refuse("the agent name's length does not fit"))?;
    let (name, rest) = rest.split_at(len);
    if rest.first() != Some(&b'|') {
        return Err(refuse("the agent entry is not terminated"));
    }
    let name = std::str::from_utf8(name).map_err(|_| refuse("the agent name is not UTF-8"))?;
    if name.contains('\0') {
        return Err(refuse("the agent name contains NUL"));
    }
    Ok(name)
}

/// A remote agent's metadata, loaded into `agent` for as long as any `RemoteAgent` of that
/// name lives.
pub(crate) struct RemoteAgent {
    agent: Agent,
    name: Arc<str>,
    counts: RemoteCounts,
}

impl std::fmt::Debug for RemoteAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RemoteAgent").field(&self.name).finish()
    }
}

impl RemoteAgent {
    /// Loads `md` into `agent` (NIXL replaces what it had for that name: a newer export of the
    /// same peer registers more memory), after checking it names `expected`.
    pub(crate) fn load(
        agent: &Agent,
        counts: &RemoteCounts,
        md: &[u8],
        expected: &str,
    ) -> Result<Self> {
        let named = md_agent_name(md)?;
        if named != expected {
            bail!(
                Peer,
                "the metadata is agent {named:?} but the export says {expected:?}"
            );
        }
        let mut live = counts.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = agent
            .load_remote_md(md)
            .map_err(|e| Error::Peer(format!("NIXL refused the peer's metadata: {e}")))?;
        if loaded != expected {
            // NIXL's own parse disagrees with kvxfer's: nothing of it may stay.
            if !live.contains_key(&loaded) {
                let _ = agent.invalidate_remote_md(&loaded);
            }
            bail!(Peer, "NIXL loaded agent {loaded:?}, not {expected:?}");
        }
        *live.entry(loaded.clone()).or_insert(0) += 1;
        Ok(Self {
            agent: agent.clone(),
            name: Arc::from(loaded),
            counts: counts.clone(),
        })
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }
}

impl Drop for RemoteAgent {
    fn drop(&mut self) {
        let mut live = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let last = match live.get_mut(&*self.name) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => true,
        };
        if last {
            live.remove(&*self.name);
            let _ = self.agent.invalidate_remote_md(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(name: &[u8]) -> Vec<u8> {
        let mut v = HEADER.to_vec();
        v.extend_from_slice(&(name.len() as u64).to_le_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(b"|Conns");
        v
    }

    #[test]
    fn the_agent_name_is_read_and_checked() {
        assert_eq!(md_agent_name(&md(b"prefill-1")).unwrap(), "prefill-1");
        for bad in [
            md(b"bad\xff"),
            md(b"nul\0"),
            md(b""),
            b"nixlSerDes|Agen".to_vec(),
            b"nixlSerDes|Agent\x05\0\0\0".to_vec(),
            b"nixlSerDes|Agent\xff\xff\xff\xff\xff\xff\xff\xffab|".to_vec(),
            b"nixlSerDes|Agent\x02\0\0\0\0\0\0\0abX".to_vec(),
            b"GET / HTTP/1.1".to_vec(),
        ] {
            assert!(
                matches!(md_agent_name(&bad), Err(Error::Peer(_))),
                "{bad:?} accepted"
            );
        }
    }
}
