// The alternative the HTTP rows compare against: Go's net/http/httputil.ReverseProxy, the
// core of kube2iam, kiam and lyft's metadataproxy. Standard library only; `cargo xtask
// bench` builds it with Go from Debian's packages.
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8190", "address to serve on")
	upstream := flag.String("upstream", "http://127.0.0.1:8080", "metadata service")
	flag.Parse()
	target, err := url.Parse(*upstream)
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	director := proxy.Director
	proxy.Director = func(r *http.Request) {
		director(r)
		// Metadata services refuse token traffic that carries X-Forwarded-For (kube2iam
		// removes it too); a nil entry keeps ReverseProxy from adding it.
		r.Header["X-Forwarded-For"] = nil
	}
	// Upstream keep-alive as for nginx (`keepalive 64`); Go's default keeps 2 per host.
	proxy.Transport = &http.Transport{
		MaxIdleConns:        64,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
	}
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
