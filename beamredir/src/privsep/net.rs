//! The network part's side of the channel: asking the root part for listeners, redirects and
//! host names, and answering its status queries.
use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use super::{
    channel::{Channel, Incoming, Link, LinkError},
    messages::{
        Family, ListenerId, NetStatus, PeerRule, RedirectSpec, SessionCommand, ToNet, ToRoot,
    },
    spawn::CHANNEL_FD,
};
use crate::session::dns_files::HostEntry;

/// How long the root part may take to answer (it only touches local kernel state and files).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RootRefused {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("unexpected answer from the root part")]
    Unexpected,
}

/// The network part's handle on the root part.
pub struct RootLink<C> {
    link: Arc<Link<ToRoot, ToNet<C>>>,
}

impl<C> Clone for RootLink<C> {
    fn clone(&self) -> Self {
        RootLink {
            link: self.link.clone(),
        }
    }
}

pub type FromRoot<C> = mpsc::Receiver<Result<Incoming<ToNet<C>>, LinkError>>;

/// What the session start gives the network part.
pub struct SessionUp {
    pub peers: PeerRule,
    pub inetrc: Option<std::path::PathBuf>,
}

impl<C: Serialize + DeserializeOwned + Send + 'static> RootLink<C> {
    /// The channel the root part left on fd 3.
    pub fn from_inherited_fd() -> std::io::Result<(Self, FromRoot<C>)> {
        // SAFETY: fd 3 is the channel by construction (see spawn.rs); nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
        // Not to be inherited by anything this process starts (credential plugins).
        nix::fcntl::fcntl(
            CHANNEL_FD,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        let (link, rx) = Link::start(Channel::new(fd)?);
        Ok((RootLink { link }, rx))
    }

    async fn ask(&self, body: ToRoot) -> Result<(ToNet<C>, Vec<OwnedFd>), RootRefused> {
        match self.link.request(body, ANSWER_TIMEOUT).await? {
            (ToNet::Refused { message }, _) => Err(RootRefused::Refused(message)),
            answer => Ok(answer),
        }
    }

    /// A new loopback listener, created by root.
    pub async fn open_listener(
        &self,
        family: Family,
    ) -> Result<(ListenerId, SocketAddr, TcpListener), RootRefused> {
        match self.ask(ToRoot::OpenListener { family }).await? {
            (ToNet::Listener { id, local }, mut fds) if fds.len() == 1 => {
                let listener = TcpListener::from(fds.pop().expect("one fd"));
                Ok((id, local, listener))
            }
            _ => Err(RootRefused::Unexpected),
        }
    }

    /// Gives a listener back: root removes its redirects, then closes it.
    pub async fn close_listener(&self, id: ListenerId) -> Result<(), RootRefused> {
        self.ask(ToRoot::CloseListener { id }).await.map(|_| ())
    }

    pub async fn start(
        &self,
        redirects: Vec<RedirectSpec>,
        hosts: Option<Vec<HostEntry>>,
        banner: String,
        hints: String,
        command: Option<SessionCommand>,
    ) -> Result<SessionUp, RootRefused> {
        match self
            .ask(ToRoot::Start {
                redirects,
                hosts,
                banner,
                hints,
                command,
            })
            .await?
        {
            (ToNet::SessionUp { peers, inetrc }, _) => Ok(SessionUp { peers, inetrc }),
            _ => Err(RootRefused::Unexpected),
        }
    }

    pub async fn set_redirects(&self, redirects: Vec<RedirectSpec>) -> Result<(), RootRefused> {
        self.ask(ToRoot::SetRedirects { redirects })
            .await
            .map(|_| ())
    }

    pub async fn set_hosts(&self, hosts: Vec<HostEntry>) -> Result<(), RootRefused> {
        self.ask(ToRoot::SetHosts { hosts }).await.map(|_| ())
    }

    pub async fn progress(&self, text: impl Into<String>) {
        let _ = self
            .link
            .notify(ToRoot::Progress { text: text.into() })
            .await;
    }

    pub async fn fatal(&self, message: impl Into<String>) {
        let _ = self
            .link
            .notify(ToRoot::Fatal {
                message: message.into(),
            })
            .await;
    }

    pub async fn answer_status(&self, to: u64, status: NetStatus) {
        let _ = self.link.reply(to, ToRoot::Status(status), None).await;
    }

    pub async fn answer_ok(&self, to: u64) {
        let _ = self.link.reply(to, ToRoot::Ok, None).await;
    }
}
