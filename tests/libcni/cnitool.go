// cnitool: a minimal runtime built on Debian's libcni (golang-github-appc-cni-dev), so the tests see our conflist
// and plugin exactly as libcni-based runtimes (podman 4, containerd, cri-o of Debian 12) do.
//
//	NETCONFPATH=DIR CNI_PATH=DIRS CNI_CACHE_DIR=DIR cnitool add|check|del NETWORK NETNS [CONTAINER_ID]
//
// CAP_ARGS (JSON) passes capability arguments such as {"ips": ["10.1.0.5/32"]}. ADD prints libcni's result as
// JSON on stdout; any error is one line on stderr and exit status 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "cnitool: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 4 || len(os.Args) > 5 {
		fail("usage: cnitool add|check|del NETWORK NETNS [CONTAINER_ID]")
	}
	command, network, netns := os.Args[1], os.Args[2], os.Args[3]
	containerID := "cnitool-" + filepath.Base(netns)
	if len(os.Args) == 5 {
		containerID = os.Args[4]
	}
	list, err := libcni.LoadConfList(os.Getenv("NETCONFPATH"), network)
	if err != nil {
		fail("loading network %s: %v", network, err)
	}
	capArgs := map[string]interface{}{}
	if raw := os.Getenv("CAP_ARGS"); raw != "" {
		if err := json.Unmarshal([]byte(raw), &capArgs); err != nil {
			fail("CAP_ARGS: %v", err)
		}
	}
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: "eth0",
		CapabilityArgs: capArgs, CacheDir: os.Getenv("CNI_CACHE_DIR")}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), rt.CacheDir, nil)
	ctx := context.Background()
	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail("add: %v", err)
		}
		if err := result.Print(); err != nil {
			fail("printing the result: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail("check: %v", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail("del: %v", err)
		}
	default:
		fail("unknown command %q", command)
	}
}
